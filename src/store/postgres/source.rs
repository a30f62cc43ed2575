//! The job's own tables in PostgreSQL: checking them in the catalogue, reading rows, enqueueing
//! pending ids and writing outputs.
//!
//! Ids travel as text and are cast to the id column's own type in SQL (`$1::text[]::uuid[]`),
//! so text, integer and uuid ids (or any type with a text form) use the column's index. Source
//! values are read as `to_json(column)::text`, so numbers stay numbers and text stays text
//! without a driver type per column. Outputs are cast to the target column's type, so a text,
//! jsonb, numeric, bytea or pgvector `vector` column takes them.

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgConnection};

use super::{IdKind, PgStore};
use crate::exit::usage;
use crate::ident::Ident;
use crate::store::{ColumnShape, Item, OutputValue, SourceInfo, Tables};

/// `(column, SQL type)` of a table, in column order; empty when the table does not exist.
async fn catalogue_columns(store: &PgStore, table: &Ident) -> anyhow::Result<Vec<(String, String)>> {
    if let Some(columns) = store.column_types.lock().expect("column type cache").get(&table.raw()) {
        return Ok(columns.clone());
    }
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
         WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
    )
    .bind(table.to_string())
    .fetch_all(&store.pool)
    .await
    .map_err(|e| store.err(e))?;
    if !columns.is_empty() {
        store.column_types.lock().expect("column type cache").insert(table.raw(), columns.clone());
    }
    Ok(columns)
}

/// The SQL type of one column of a table (after `inspect` checked it exists).
pub(super) async fn column_type(store: &PgStore, table: &Ident, column: &Ident) -> anyhow::Result<String> {
    catalogue_columns(store, table)
        .await?
        .into_iter()
        .find(|(name, _)| name == column.name())
        .map(|(_, kind)| kind)
        .ok_or_else(|| usage(format!("table {} has no column {}", table.raw(), column.name())))
}

fn select_list(tables: &Tables) -> String {
    let mut list = vec![format!("{}::text", tables.id)];
    list.extend(tables.columns.iter().map(|c| format!("to_json({c})::text")));
    list.join(", ")
}

pub(super) async fn inspect(store: &PgStore, tables: &Tables, count: bool) -> anyhow::Result<SourceInfo> {
    let existing = catalogue_columns(store, &tables.table).await?;
    if existing.is_empty() {
        return Err(no_such_table(store, "`source.table`", &tables.table).await?);
    }
    let names: Vec<&str> = existing.iter().map(|(name, _)| name.as_str()).collect();
    let mut wanted = vec![("source.id", &tables.id)];
    wanted.extend(tables.columns.iter().map(|c| ("source.columns", c)));
    wanted.extend(tables.outputs.iter().map(|(_, c)| ("target", c)));
    for (key, column) in wanted {
        if !names.contains(&column.name()) {
            return Err(usage(format!(
                "`{key}`: table {} has no column {} (it has: {}); fix the name, or add the column \
                 (e.g. ALTER TABLE {} ADD COLUMN {} text)",
                tables.table.raw(),
                column.name(),
                names.join(", "),
                tables.table.raw(),
                column.name()
            )));
        }
    }
    // Without `count`, the condition is only checked: the database plans it (and rejects what
    // it cannot run) but reads no row, whatever the table's size.
    let limit = if count { "" } else { " LIMIT 0" };
    let count = format!("SELECT COUNT(*) FROM (SELECT 1 FROM {} WHERE ({}){limit}) q", tables.table, tables.pending);
    let pending: i64 = sqlx::query_scalar(AssertSqlSafe(count)).fetch_one(&store.pool).await.map_err(|e| {
        let message = e.as_database_error().map(|d| d.message().to_owned()).unwrap_or_else(|| e.to_string());
        usage(format!("`source.pending`: PostgreSQL rejected the condition {:?}: {message}", tables.pending))
    })?;
    Ok(SourceInfo { pending: pending.max(0) as u64 })
}

/// "table T does not exist in SERVER (schemas searched: …; it has tables: …)", for the key or
/// flag that named it.
async fn no_such_table(store: &PgStore, named_by: &str, table: &Ident) -> anyhow::Result<anyhow::Error> {
    let schema: String =
        sqlx::query_scalar("SELECT current_schemas(false)::text").fetch_one(&store.pool).await.map_err(|e| store.err(e))?;
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT CASE WHEN table_schema = ANY (current_schemas(false)) THEN table_name \
         ELSE table_schema || '.' || table_name END FROM information_schema.tables \
         WHERE table_schema NOT IN ('pg_catalog', 'information_schema') AND table_name NOT LIKE 'backfill\\_%' \
         AND table_name NOT LIKE '\\_sqlx%' ORDER BY 1 LIMIT 50",
    )
    .fetch_all(&store.pool)
    .await
    .map_err(|e| store.err(e))?;
    Ok(usage(format!(
        "{named_by}: table {} does not exist in {} (schemas searched: {schema}; {}); check the name, write \
         it as schema.table, or set the search_path in the URL",
        table.raw(),
        store.server,
        super::super::existing_tables(&names)
    )))
}

/// The table's columns in order, with their types and primary key, from the catalogue.
pub(super) async fn describe(store: &PgStore, table: &Ident) -> anyhow::Result<Vec<ColumnShape>> {
    let columns = catalogue_columns(store, table).await?;
    if columns.is_empty() {
        return Err(no_such_table(store, "--table", table).await?);
    }
    let key: Vec<String> = sqlx::query_scalar(
        "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
         WHERE i.indrelid = to_regclass($1) AND i.indisprimary",
    )
    .bind(table.to_string())
    .fetch_all(&store.pool)
    .await
    .map_err(|e| store.err(e))?;
    Ok(columns
        .into_iter()
        .map(|(name, sql_type)| ColumnShape { primary_key: key.contains(&name), name, sql_type })
        .collect())
}

pub(super) fn pending_rows<'a>(store: &'a PgStore, tables: &'a Tables, limit: Option<u64>) -> BoxStream<'a, anyhow::Result<Item>> {
    use sqlx::Row;
    let sql = format!(
        "SELECT {} FROM {} WHERE ({}) AND {} IS NOT NULL ORDER BY {} LIMIT $1",
        select_list(tables),
        tables.table,
        tables.pending,
        tables.id,
        tables.id
    );
    let width = tables.columns.len() + 1;
    sqlx::query(AssertSqlSafe(sql))
        .bind(limit.map(|l| l.min(i64::MAX as u64) as i64))
        .fetch(&store.pool)
        .map(move |row| {
            let row = row.map_err(|e| store.err(e))?;
            let texts = (0..width).map(|i| row.try_get::<Option<String>, _>(i)).collect::<Result<Vec<_>, _>>().map_err(|e| store.err(e))?;
            item_from_texts(texts, tables)
        })
        .boxed()
}

/// The id column's SQL type, stored with the run.
pub(super) async fn id_kind(store: &PgStore, tables: &Tables) -> anyhow::Result<IdKind> {
    column_type(store, &tables.table, &tables.id).await
}

/// Enqueues up to `want` pending ids after `after` (an id as text; from the first with `None`),
/// in id order, numbered on from `base`; returns how many and the last of them as text. One
/// statement: the chunk is read once, inserted, and its last id returned (ordered by the id,
/// not by its text: `c.id`, since a bare `id` would name the output column `id::text`).
#[allow(clippy::too_many_arguments)]
pub(super) async fn enqueue_after(
    conn: &mut PgConnection,
    tables: &Tables,
    run_id: i64,
    id_type: &str,
    after: Option<&str>,
    base: u64,
    want: u64,
    now: i64,
) -> Result<(u64, Option<String>), sqlx::Error> {
    let (id, table, pending) = (&tables.id, &tables.table, &tables.pending);
    let after_clause = if after.is_some() { format!(" AND {id} > $5::text::{id_type}") } else { String::new() };
    let sql = format!(
        "WITH chunk AS (SELECT {id} AS id FROM {table} WHERE ({pending}) AND {id} IS NOT NULL{after_clause} \
         ORDER BY {id} LIMIT $4), \
         added AS (INSERT INTO backfill_items (run_id, item_id, seq, state, updated_at) \
         SELECT $1, c.id::text, $2 + ROW_NUMBER() OVER (ORDER BY c.id), 'pending', $3 FROM chunk c RETURNING 1) \
         SELECT (SELECT COUNT(*) FROM added), (SELECT c.id::text AS last FROM chunk c ORDER BY c.id DESC LIMIT 1)"
    );
    let mut query = sqlx::query_as::<_, (i64, Option<String>)>(AssertSqlSafe(sql))
        .bind(run_id)
        .bind(base.min(i64::MAX as u64) as i64)
        .bind(now)
        .bind(want.min(i64::MAX as u64) as i64);
    if let Some(after) = after {
        query = query.bind(after.to_owned());
    }
    let (added, last) = query.fetch_one(conn).await?;
    Ok((added.max(0) as u64, last))
}

/// Reads the source rows of these ids (missing rows are simply absent).
pub(super) async fn rows_by_id(
    conn: &mut PgConnection,
    tables: &Tables,
    id_type: &str,
    ids: &[String],
) -> Result<Vec<Item>, anyhow::Error> {
    let sql = format!(
        "SELECT {} FROM {} WHERE {} = ANY($1::text[]::{id_type}[])",
        select_list(tables),
        tables.table,
        tables.id
    );
    let rows = fetch_text_rows(conn, sql, Some(ids.to_vec()), tables.columns.len() + 1, None).await?;
    rows.into_iter().map(|row| item_from_texts(row, tables)).collect()
}

/// Runs a query whose columns are all text, binding either an id array or a limit.
async fn fetch_text_rows<'c, E>(
    executor: E,
    sql: String,
    ids: Option<Vec<String>>,
    width: usize,
    limit: Option<i64>,
) -> Result<Vec<Vec<Option<String>>>, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Postgres>,
{
    use sqlx::Row;
    let query = sqlx::query(AssertSqlSafe(sql));
    let query = match ids {
        Some(ids) => query.bind(ids),
        None => query.bind(limit),
    };
    let rows = query.fetch_all(executor).await?;
    rows.iter().map(|row| (0..width).map(|i| row.try_get::<Option<String>, _>(i)).collect()).collect()
}

fn item_from_texts(row: Vec<Option<String>>, tables: &Tables) -> anyhow::Result<Item> {
    let mut values = row.into_iter();
    let id = values.next().flatten().unwrap_or_default();
    let fields = tables
        .columns
        .iter()
        .map(|column| {
            let value = match values.next().flatten() {
                Some(json) => serde_json::from_str(&json)?,
                None => Value::Null,
            };
            Ok((column.name().to_owned(), value))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Item { id, fields })
}

/// One output ready to bind, cast to its column's type.
enum Bound {
    Text(String),
    Bytes(Vec<u8>),
    Real(f64),
}

/// How a value is bound for a column type; a float32 BLOB becomes a vector literal for a
/// pgvector column.
fn bind_for(value: &OutputValue, column_type: &str) -> anyhow::Result<(Bound, &'static str)> {
    let vector = column_type == "vector" || column_type.starts_with("vector(");
    Ok(match value {
        OutputValue::Text(text) => (Bound::Text(text.clone()), "text"),
        OutputValue::Real(x) => (Bound::Real(*x), "double precision"),
        OutputValue::Blob(bytes) if vector => (Bound::Text(vector_literal(bytes)?), "text"),
        OutputValue::Blob(bytes) => (Bound::Bytes(bytes.clone()), "bytea"),
    })
}

/// A little-endian float32 array as a pgvector literal: `[0.1,0.2,…]`.
pub(crate) fn vector_literal(bytes: &[u8]) -> anyhow::Result<String> {
    if !bytes.len().is_multiple_of(4) {
        anyhow::bail!("an f32le embedding of {} bytes is not a whole number of float32 values", bytes.len());
    }
    let floats: Vec<String> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .map(|f| if f.is_finite() { format!("{f}") } else { "NaN".into() })
        .collect();
    Ok(format!("[{}]", floats.join(",")))
}

/// Writes one item's outputs; returns false when the target already held a value (and the job
/// does not overwrite) or the row is gone.
pub(super) async fn write_target(
    store: &PgStore,
    conn: &mut PgConnection,
    tables: &Tables,
    id_type: &str,
    id: &str,
    values: &[(String, OutputValue)],
) -> anyhow::Result<bool> {
    let mut sets = Vec::new();
    let mut binds = Vec::new();
    let mut empty_any = Vec::new();
    for (key, column) in &tables.outputs {
        let Some((_, value)) = values.iter().find(|(k, _)| k == key) else { continue };
        let kind = column_type(store, &tables.table, column).await?;
        let (bound, bound_type) = bind_for(value, &kind)?;
        let n = binds.len() + 1;
        let cast = format!("CAST(CAST(${n} AS {bound_type}) AS {kind})");
        if tables.overwrite {
            sets.push(format!("{column} = {cast}"));
        } else {
            sets.push(format!("{column} = CASE WHEN {column} IS NULL OR {column}::text = '' THEN {cast} ELSE {column} END"));
            empty_any.push(format!("{column} IS NULL OR {column}::text = ''"));
        }
        binds.push(bound);
    }
    if sets.is_empty() {
        return Ok(false);
    }
    let id_param = binds.len() + 1;
    let mut sql = format!("UPDATE {} SET {} WHERE {} = CAST(${id_param} AS text)::{id_type}", tables.table, sets.join(", "), tables.id);
    if !empty_any.is_empty() {
        sql.push_str(&format!(" AND ({})", empty_any.join(" OR ")));
    }
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for bound in binds {
        query = match bound {
            Bound::Text(text) => query.bind(text),
            Bound::Bytes(bytes) => query.bind(bytes),
            Bound::Real(x) => query.bind(x),
        };
    }
    query = query.bind(id.to_owned());
    Ok(query.execute(conn).await.map_err(|e| store.err(e))?.rows_affected() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32le_bytes_become_a_vector_literal() {
        let bytes: Vec<u8> = [0.5f32, -1.25, 3.0].iter().flat_map(|f| f.to_le_bytes()).collect();
        assert_eq!(vector_literal(&bytes).unwrap(), "[0.5,-1.25,3]");
        assert!(vector_literal(&bytes[..5]).is_err());
    }

    #[test]
    fn blobs_bind_as_bytea_except_for_vector_columns() {
        let blob = OutputValue::Blob(1.0f32.to_le_bytes().to_vec());
        assert!(matches!(bind_for(&blob, "bytea").unwrap(), (Bound::Bytes(_), "bytea")));
        assert!(matches!(bind_for(&blob, "vector(384)").unwrap(), (Bound::Text(t), "text") if t == "[1]"));
    }
}
