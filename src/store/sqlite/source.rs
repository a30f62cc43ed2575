//! The job's own tables in SQLite: checking them, reading rows, enqueueing pending ids and
//! writing outputs.

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use serde_json::Value;
use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, Row, SqliteConnection, TypeInfo, ValueRef};

use super::{IdKind, SqliteStore};
use crate::exit::usage;
use crate::ident::Ident;
use crate::store::{ColumnShape, Item, OutputValue, SourceInfo, Tables};

fn select_list(tables: &Tables) -> String {
    let mut list = vec![tables.id.to_string()];
    list.extend(tables.columns.iter().map(|c| c.to_string()));
    list.join(", ")
}

pub(super) async fn inspect(store: &SqliteStore, tables: &Tables, count: bool) -> anyhow::Result<SourceInfo> {
    // Ask the catalogue: SQLite reads a double-quoted name that is not a column as a string
    // literal, so a probe query would accept a misspelt column.
    let existing: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info(?, ?)")
        .bind(tables.table.name())
        .bind(tables.table.schema().unwrap_or("main"))
        .fetch_all(&store.pool)
        .await
        .map_err(|e| store.err(e))?;
    if existing.is_empty() {
        return Err(no_such_table(store, "`source.table`", &tables.table).await);
    }
    let mut wanted = vec![("source.id", &tables.id)];
    wanted.extend(tables.columns.iter().map(|c| ("source.columns", c)));
    wanted.extend(tables.outputs.iter().map(|(_, c)| ("target", c)));
    for (key, column) in wanted {
        if !existing.iter().any(|name| name == column.name()) {
            return Err(usage(format!(
                "`{key}`: table {} has no column {} (it has: {}); fix the name, or add the column \
                 (e.g. ALTER TABLE {} ADD COLUMN {} TEXT)",
                tables.table.raw(),
                column.name(),
                existing.join(", "),
                tables.table.raw(),
                column.name()
            )));
        }
    }
    // Without `count`, the condition is only checked: the database plans it (and rejects what
    // it cannot run) but reads no row, whatever the table's size.
    let limit = if count { "" } else { " LIMIT 0" };
    let count = format!("SELECT COUNT(*) FROM (SELECT 1 FROM {} WHERE ({}){limit}) q", tables.table, tables.pending);
    let pending: i64 = sqlx::query_scalar(AssertSqlSafe(count))
        .fetch_one(&store.pool)
        .await
        .map_err(|e| {
            usage(format!(
                "`source.pending`: the database rejected the condition {:?}: {e}",
                tables.pending
            ))
        })?;
    Ok(SourceInfo { pending: pending.max(0) as u64 })
}

/// "table T does not exist in DB (it has tables: …)", for the key or flag that named it.
async fn no_such_table(store: &SqliteStore, named_by: &str, table: &Ident) -> anyhow::Error {
    let names: Result<Vec<String>, _> = sqlx::query_scalar(
        "SELECT name FROM sqlite_schema WHERE type IN ('table', 'view') \
         AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name NOT LIKE 'backfill\\_%' ESCAPE '\\' \
         AND name NOT LIKE '\\_sqlx%' ESCAPE '\\' ORDER BY name LIMIT 50",
    )
    .fetch_all(&store.pool)
    .await;
    match names {
        Ok(names) => usage(format!(
            "{named_by}: table {} does not exist in {} ({}); check the name and the database",
            table.raw(),
            store.path.display(),
            super::super::existing_tables(&names)
        )),
        Err(e) => store.err(e),
    }
}

/// The table's columns in order, with their declared types and primary key.
pub(super) async fn describe(store: &SqliteStore, table: &Ident) -> anyhow::Result<Vec<ColumnShape>> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as("SELECT name, type, pk FROM pragma_table_info(?, ?) ORDER BY cid")
        .bind(table.name())
        .bind(table.schema().unwrap_or("main"))
        .fetch_all(&store.pool)
        .await
        .map_err(|e| store.err(e))?;
    if rows.is_empty() {
        return Err(no_such_table(store, "--table", table).await);
    }
    Ok(rows.into_iter().map(|(name, sql_type, pk)| ColumnShape { name, sql_type, primary_key: pk > 0 }).collect())
}

pub(super) fn pending_rows<'a>(store: &'a SqliteStore, tables: &'a Tables, limit: Option<u64>) -> BoxStream<'a, anyhow::Result<Item>> {
    let sql = format!(
        "SELECT {} FROM {} WHERE ({}) AND {} IS NOT NULL ORDER BY {} LIMIT ?",
        select_list(tables),
        tables.table,
        tables.pending,
        tables.id,
        tables.id
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(limit.map(|l| l.min(i64::MAX as u64) as i64).unwrap_or(-1))
        .fetch(&store.pool)
        .map(move |row| row.map_err(|e| store.err(e)).and_then(|row| item_from_row(&row, tables)))
        .boxed()
}

/// Whether every pending id is an integer (then ids are bound as integers). An id column that
/// is the table's rowid (`INTEGER PRIMARY KEY` of a rowid table) holds nothing else, which the
/// catalogue says without reading the table; any other column is read.
pub(super) async fn detect_id_kind(conn: &mut SqliteConnection, tables: &Tables) -> Result<IdKind, sqlx::Error> {
    let schema = tables.table.schema().unwrap_or("main");
    let keys: Vec<(String, String)> =
        sqlx::query_as("SELECT name, upper(type) FROM pragma_table_info(?, ?) WHERE pk > 0")
            .bind(tables.table.name())
            .bind(schema)
            .fetch_all(&mut *conn)
            .await?;
    let without_rowid: Option<i64> = sqlx::query_scalar("SELECT wr FROM pragma_table_list(?) WHERE schema = ?")
        .bind(tables.table.name())
        .bind(schema)
        .fetch_optional(&mut *conn)
        .await?;
    if let [(name, sql_type)] = keys.as_slice()
        && name == tables.id.name()
        && sql_type == "INTEGER"
        && without_rowid == Some(0)
    {
        return Ok(IdKind::Integer);
    }
    let sql = format!(
        "SELECT COUNT(*) FROM {} WHERE ({}) AND typeof({}) <> 'integer'",
        tables.table, tables.pending, tables.id
    );
    let non_integer: i64 = sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(conn).await?;
    Ok(if non_integer == 0 { IdKind::Integer } else { IdKind::Text })
}

/// A source id as SQLite holds it, with its own type: the enqueue's cursor, compared with the
/// id column as the column's values compare among themselves (an integer stays an integer).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Cursor {
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl Cursor {
    /// The value at `index` of a row; `None` for NULL.
    pub(super) fn read(row: &SqliteRow, index: usize) -> Result<Option<Cursor>, sqlx::Error> {
        let raw = row.try_get_raw(index)?;
        if raw.is_null() {
            return Ok(None);
        }
        let type_name = raw.type_info().name().to_owned();
        Ok(Some(match type_name.as_str() {
            "INTEGER" => Cursor::Integer(row.try_get(index)?),
            "REAL" => Cursor::Real(row.try_get(index)?),
            "BLOB" => Cursor::Blob(row.try_get(index)?),
            _ => Cursor::Text(row.try_get(index)?),
        }))
    }

    pub(super) fn bind<'q>(
        &self,
        query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
        match self {
            Cursor::Integer(n) => query.bind(*n),
            Cursor::Real(x) => query.bind(*x),
            Cursor::Text(text) => query.bind(text.clone()),
            Cursor::Blob(bytes) => query.bind(bytes.clone()),
        }
    }
}

/// Enqueues up to `want` pending ids after `after` (from the first with `None`), in id order,
/// numbered on from `base`; returns how many and the last of them. Two statements over the
/// same few thousand rows: the chunk's bounds, then the insert of exactly that range.
pub(super) async fn enqueue_after(
    conn: &mut SqliteConnection,
    tables: &Tables,
    run_id: i64,
    after: Option<&Cursor>,
    base: u64,
    want: u64,
    now: i64,
) -> Result<(u64, Option<Cursor>), sqlx::Error> {
    let (id, table, pending) = (&tables.id, &tables.table, &tables.pending);
    let after_clause = if after.is_some() { format!(" AND {id} > ?") } else { String::new() };
    let bounds = format!(
        "SELECT MAX(q.id), COUNT(*) FROM (SELECT {id} AS id FROM {table} WHERE ({pending}) AND {id} IS NOT NULL{after_clause} \
         ORDER BY {id} LIMIT ?) q"
    );
    let mut query = sqlx::query(AssertSqlSafe(bounds));
    if let Some(after) = after {
        query = after.bind(query);
    }
    let row = query.bind(want.min(i64::MAX as u64) as i64).fetch_one(&mut *conn).await?;
    let (Some(last), count) = (Cursor::read(&row, 0)?, row.try_get::<i64, _>(1)?) else {
        return Ok((0, None));
    };
    let insert = format!(
        "INSERT INTO backfill_items (run_id, item_id, seq, state, updated_at) \
         SELECT ?, CAST(q.id AS TEXT), ? + ROW_NUMBER() OVER (ORDER BY q.id), 'pending', ? \
         FROM (SELECT {id} AS id FROM {table} WHERE ({pending}) AND {id} IS NOT NULL{after_clause} AND {id} <= ?) q"
    );
    let mut query = sqlx::query(AssertSqlSafe(insert)).bind(run_id).bind(base.min(i64::MAX as u64) as i64).bind(now);
    if let Some(after) = after {
        query = after.bind(query);
    }
    let added = last.bind(query).execute(&mut *conn).await?.rows_affected();
    debug_assert_eq!(added, count.max(0) as u64);
    Ok((added, Some(last)))
}

/// Reads the source rows of these ids (missing rows are simply absent).
pub(super) async fn rows_by_id(
    conn: &mut SqliteConnection,
    tables: &Tables,
    kind: IdKind,
    ids: &[String],
) -> anyhow::Result<Vec<Item>> {
    let mut items = Vec::with_capacity(ids.len());
    // SQLite allows 32766 parameters; batches are far smaller, but stay well inside it.
    for chunk in ids.chunks(500) {
        let placeholders = vec!["?"; chunk.len()].join(", ");
        let sql = format!(
            "SELECT {} FROM {} WHERE {} IN ({placeholders})",
            select_list(tables),
            tables.table,
            tables.id
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for id in chunk {
            query = bind_id(query, kind, id);
        }
        for row in query.fetch_all(&mut *conn).await? {
            items.push(item_from_row(&row, tables)?);
        }
    }
    Ok(items)
}

pub(super) fn bind_id<'q>(
    query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    kind: IdKind,
    id: &str,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    match (kind, id.parse::<i64>()) {
        (IdKind::Integer, Ok(n)) => query.bind(n),
        _ => query.bind(id.to_owned()),
    }
}

/// Writes one item's outputs; returns false when the target already held a value (and the job
/// does not overwrite) or the row is gone.
pub(super) async fn write_target(
    conn: &mut SqliteConnection,
    tables: &Tables,
    kind: IdKind,
    id: &str,
    values: &[(String, OutputValue)],
) -> Result<bool, sqlx::Error> {
    let mut sets = Vec::new();
    let mut binds = Vec::new();
    let mut empty_any = Vec::new();
    for (key, column) in &tables.outputs {
        let Some((_, value)) = values.iter().find(|(k, _)| k == key) else { continue };
        if tables.overwrite {
            sets.push(format!("{column} = ?"));
        } else {
            sets.push(format!("{column} = CASE WHEN {column} IS NULL OR {column} = '' THEN ? ELSE {column} END"));
            empty_any.push(format!("{column} IS NULL OR {column} = ''"));
        }
        binds.push(value.clone());
    }
    if sets.is_empty() {
        return Ok(false);
    }
    let mut sql = format!("UPDATE {} SET {} WHERE {} = ?", tables.table, sets.join(", "), tables.id);
    if !empty_any.is_empty() {
        sql.push_str(&format!(" AND ({})", empty_any.join(" OR ")));
    }
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for value in binds {
        query = match value {
            OutputValue::Text(text) => query.bind(text),
            OutputValue::Blob(bytes) => query.bind(bytes),
            OutputValue::Real(x) => query.bind(x),
        };
    }
    query = bind_id(query, kind, id);
    Ok(query.execute(conn).await?.rows_affected() > 0)
}

fn item_from_row(row: &SqliteRow, tables: &Tables) -> anyhow::Result<Item> {
    let id = match decode(row, 0)? {
        Value::String(s) => s,
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    };
    let fields = tables
        .columns
        .iter()
        .enumerate()
        .map(|(i, column)| Ok((column.name().to_owned(), decode(row, i + 1)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Item { id, fields })
}

/// A SQLite value as JSON, by its runtime type.
fn decode(row: &SqliteRow, index: usize) -> anyhow::Result<Value> {
    let raw = row.try_get_raw(index)?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let type_name = raw.type_info().name().to_owned();
    Ok(match type_name.as_str() {
        "INTEGER" => Value::from(row.try_get::<i64, _>(index)?),
        "REAL" => serde_json::Number::from_f64(row.try_get::<f64, _>(index)?).map(Value::Number).unwrap_or(Value::Null),
        "BLOB" => Value::String(String::from_utf8_lossy(&row.try_get::<Vec<u8>, _>(index)?).into_owned()),
        _ => Value::String(row.try_get::<String, _>(index)?),
    })
}
