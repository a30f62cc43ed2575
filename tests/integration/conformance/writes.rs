//! The batch write: only-where-empty and overwrite, object outputs of text, numbers and bytes,
//! item states, ids of every kind, schema-qualified tables, and source rows that vanished.

use std::sync::Arc;

use backfill::ident::Ident;
use backfill::store::{ItemChange, ItemUpdate, OutputValue};

use super::*;

conformance!(
    writes_only_where_empty_unless_overwrite,
    object_outputs_write_text_numbers_and_bytes,
    retries_failures_and_rejections_set_item_states,
    text_ids_claim_and_write,
    uuid_ids_claim_and_write,
    schema_qualified_tables_are_read_and_written,
    a_source_row_deleted_after_enqueue_fails_its_item,
);

async fn writes_only_where_empty_unless_overwrite(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 3).await;
    let mut t = tables("items");
    let run = new_run(&db, &t, None).await;
    let claimed = db.store.claim(&t, run.id, &worker("a"), 3, LEASE).await.unwrap().items;
    // Someone fills row 2 by hand while the call is out.
    db.exec("UPDATE items SET summary = 'met de hand' WHERE id = 2").await;
    let call = reserve(&db, run.id, &worker("a"), &claimed, 10).await;
    let report = db.store.write_batch(&t, &batch(run.id, call, settled(5, 3), done_all(&claimed, "model"))).await.unwrap();
    assert_eq!((report.written, report.skipped, report.stale), (2, 1, 0), "{}", db.backend);
    assert_eq!(db.text("SELECT summary FROM items WHERE id = 2").await.as_deref(), Some("met de hand"));
    assert_eq!(db.text("SELECT reason FROM backfill_items WHERE item_id = '2'").await.as_deref(), Some("target_not_empty"));
    assert_eq!(db.count("SELECT COUNT(*) FROM backfill_outputs WHERE status = 'skipped'").await, 1);
    assert_eq!(db.count("SELECT COUNT(*) FROM backfill_items WHERE state = 'done'").await, 3);

    // A run that overwrites writes every row, the hand-written one too.
    db.store.set_status(run.id, backfill::store::RunStatus::Finished, None).await.unwrap();
    t.overwrite = true;
    t.pending = "1 = 1".into();
    let second = new_run(&db, &t, None).await;
    let claimed = db.store.claim(&t, second.id, &worker("a"), 3, LEASE).await.unwrap().items;
    let call = reserve(&db, second.id, &worker("a"), &claimed, 10).await;
    let report = db.store.write_batch(&t, &batch(second.id, call, settled(5, 3), done_all(&claimed, "again"))).await.unwrap();
    assert_eq!((report.written, report.skipped), (3, 0));
    assert_eq!(db.text("SELECT summary FROM items WHERE id = 2").await.as_deref(), Some("again 2"));
}

async fn object_outputs_write_text_numbers_and_bytes(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 2).await;
    let mut t = tables("items");
    t.outputs = vec![
        ("summary".into(), Ident::column("summary").unwrap()),
        ("topic".into(), Ident::column("topic").unwrap()),
        ("score".into(), Ident::column("score").unwrap()),
        ("embedding".into(), Ident::column("embedding").unwrap()),
    ];
    let run = new_run(&db, &t, None).await;
    let claimed = db.store.claim(&t, run.id, &worker("a"), 2, LEASE).await.unwrap().items;
    let call = reserve(&db, run.id, &worker("a"), &claimed, 10).await;
    let floats: Vec<u8> = [0.25f32, -1.5].iter().flat_map(|f| f.to_le_bytes()).collect();
    let updates: Vec<ItemUpdate> = claimed
        .iter()
        .map(|c| ItemUpdate {
            lease: c.lease.clone(),
            change: ItemChange::Done {
                values: vec![
                    ("summary".into(), OutputValue::Text(format!("samenvatting {}", c.item.id))),
                    ("topic".into(), OutputValue::Text("zorg".into())),
                    ("score".into(), OutputValue::Real(0.875)),
                    ("embedding".into(), OutputValue::Blob(floats.clone())),
                ],
            },
            output: None,
        })
        .collect();
    let report = db.store.write_batch(&t, &batch(run.id, call, settled(5, 2), updates)).await.unwrap();
    assert_eq!(report.written, 2, "{}", db.backend);
    assert_eq!(db.text("SELECT summary || '|' || topic FROM items WHERE id = 1").await.as_deref(), Some("samenvatting 1|zorg"));
    assert_eq!(db.count("SELECT COUNT(*) FROM items WHERE score = 0.875").await, 2);
    let length = if db.is_postgres() { "octet_length(embedding)::bigint" } else { "length(embedding)" };
    assert_eq!(db.count(&format!("SELECT {length} FROM items WHERE id = 2")).await, 8);
    let hex = if db.is_postgres() { "encode(embedding, 'hex')" } else { "lower(hex(embedding))" };
    let expected = hex::encode(&floats);
    assert_eq!(db.text(&format!("SELECT {hex} FROM items WHERE id = 1")).await, Some(expected));
}

async fn retries_failures_and_rejections_set_item_states(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 3).await;
    let t = tables("items");
    let run = new_run(&db, &t, None).await;
    let claimed = db.store.claim(&t, run.id, &worker("a"), 3, LEASE).await.unwrap().items;
    let call = reserve(&db, run.id, &worker("a"), &claimed, 10).await;
    let far = backfill::store::now_ms() + 3_600_000;
    let changes = [
        ItemChange::Retry { attempts: 1, tier: 1, group_limit: Some(2), not_before: far, error: "missing".into(), reason: "missing".into() },
        ItemChange::Failed { attempts: 4, error: "kept failing".into(), reason: "malformed".into() },
        ItemChange::Rejected { attempts: 4, error: "too short".into(), reason: "min_chars".into() },
    ];
    let updates = claimed.iter().zip(changes).map(|(c, change)| ItemUpdate { lease: c.lease.clone(), change, output: None }).collect();
    db.store.write_batch(&t, &batch(run.id, call, settled(5, 0), updates)).await.unwrap();
    let counts = db.store.item_counts(run.id).await.unwrap();
    assert_eq!((counts.pending, counts.failed, counts.rejected), (1, 1, 1), "{}", db.backend);
    assert_eq!(db.count("SELECT tier * 100 + group_limit * 10 + attempts FROM backfill_items WHERE item_id = '1'").await, 121);
    // The retried item waits for its backoff: nothing is ready, but the claim says when.
    let claim = db.store.claim(&t, run.id, &worker("a"), 3, LEASE).await.unwrap();
    assert!(claim.items.is_empty());
    assert_eq!(claim.next_ready_at, Some(far));
    let report = db.store.status("conformance", Some(run.id)).await.unwrap().unwrap();
    let mut reasons: Vec<(String, String, u64)> = report.reasons.clone();
    reasons.sort();
    assert_eq!(reasons, [("failed".into(), "malformed".into(), 1), ("rejected".into(), "min_chars".into(), 1)]);
}

async fn claim_and_write_ids(db: &Db, ids: Ids) {
    db.source_table("items", ids, 3).await;
    let t = tables("items");
    let run = new_run(db, &t, None).await;
    let claimed = db.store.claim(&t, run.id, &worker("a"), 3, LEASE).await.unwrap().items;
    let got: Vec<String> = claimed.iter().map(|c| c.item.id.clone()).collect();
    assert_eq!(got, (1..=3).map(|i| ids.id(i)).collect::<Vec<_>>(), "{}", db.backend);
    let call = reserve(db, run.id, &worker("a"), &claimed, 10).await;
    let report = db.store.write_batch(&t, &batch(run.id, call, settled(5, 3), done_all(&claimed, "uitleg"))).await.unwrap();
    assert_eq!(report.written, 3);
    let second = ids.id(2);
    let where_id = id_literal(db, ids, &second);
    assert_eq!(db.text(&format!("SELECT summary FROM items WHERE id = {where_id}")).await, Some(format!("uitleg {second}")));
    // Replaying exactly these ids claims nothing: they are done.
    assert!(db.store.claim_ids(&t, run.id, &worker("a"), &got, LEASE).await.unwrap().is_none());
}

async fn text_ids_claim_and_write(db: Arc<Db>) {
    claim_and_write_ids(&db, Ids::Text).await;
}

/// PostgreSQL's `uuid` type; in SQLite a column declared `UUID` holding uuids as text.
async fn uuid_ids_claim_and_write(db: Arc<Db>) {
    claim_and_write_ids(&db, Ids::Uuid).await;
}

async fn schema_qualified_tables_are_read_and_written(db: Arc<Db>) {
    // PostgreSQL: a table in another schema than the runner tables. SQLite: the main schema.
    let table = if db.is_postgres() {
        let schema = harness::unique_schema("bf_src");
        db.exec(&format!("CREATE SCHEMA {schema}")).await;
        format!("{schema}.motions")
    } else {
        "main.motions".to_owned()
    };
    db.source_table(&table, Ids::Integer, 2).await;
    let t = tables(&table);
    let run = new_run(&db, &t, None).await;
    let claimed = db.store.claim(&t, run.id, &worker("a"), 2, LEASE).await.unwrap().items;
    assert_eq!(claimed.len(), 2, "{}", db.backend);
    let call = reserve(&db, run.id, &worker("a"), &claimed, 10).await;
    db.store.write_batch(&t, &batch(run.id, call, settled(5, 2), done_all(&claimed, "x"))).await.unwrap();
    assert_eq!(db.count(&format!("SELECT COUNT(*) FROM {table} WHERE summary LIKE 'x %'")).await, 2);
    if let Some(schema) = table.split_once('.').map(|(s, _)| s).filter(|_| db.is_postgres()) {
        db.exec(&format!("DROP SCHEMA {schema} CASCADE")).await;
    }
}

async fn a_source_row_deleted_after_enqueue_fails_its_item(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 3).await;
    let t = tables("items");
    let run = new_run(&db, &t, None).await;
    db.exec("DELETE FROM items WHERE id = 2").await;
    let claim = db.store.claim(&t, run.id, &worker("a"), 3, LEASE).await.unwrap();
    assert_eq!((claim.items.len(), claim.vanished), (2, 1), "{}", db.backend);
    assert_eq!(db.text("SELECT reason FROM backfill_items WHERE item_id = '2'").await.as_deref(), Some("source_row_missing"));
}
