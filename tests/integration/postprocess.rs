//! Post-processing in the runner: cleaned outputs are written with their changes recorded;
//! rejected outputs are retried on the fallback model, then end `rejected` with their reason,
//! their raw output kept for audit and counted by reason in `status`.

use serde_json::Value;

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn rejected_outputs_go_to_the_fallback_model_then_end_rejected_with_their_reason() {
    // The fake answers "Uitleg bij {id}: <12 hex digits>": 26 characters for ids 1-9, 27 for
    // 10-99. `strip` removes "Uitleg bij "; `max_chars = 15` then rejects the two-digit ids.
    let fx = Fixture::new(30).await;
    let fake = FakeProvider::start(vec![], vec![], 71).await;
    let tail = r#"
[pricing.fake-fallback]
input = 1.0
output = 2.0

[postprocess]
strip = ['^Uitleg bij ']
max_chars = 15
"#;
    fx.write_job(&fake.base_url(), "fallback = [\"fake-fallback\"]", "", tail);
    let output = backfill_async(fx.dir.path(), &["run", fx.job.to_str().unwrap(), "--json", "--quiet"], &[]).await;
    // 21 of 30 rejected is above `limits.max_failed_share` (0.1): finished, exit 6.
    assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
    assert!(stderr(&output).contains("21 rejected: too_long"), "{}", stderr(&output));
    let summary: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(summary["status"], "too_many_failures", "{summary}");
    assert_eq!(summary["items"]["done"], 9, "{summary}");
    assert_eq!(summary["items"]["rejected"], 21, "{summary}");

    for (id, title, body, summary) in fx.rows().await {
        let expected = expected_output(&id.to_string(), &title, &body);
        if id < 10 {
            assert_eq!(summary.as_deref(), Some(expected.trim_start_matches("Uitleg bij ")), "row {id}");
        } else {
            assert_eq!(summary, None, "row {id} was rejected and must stay empty");
        }
    }
    let pool = fx.pool().await;
    // Each rejected item was tried on the primary model, then on the fallback.
    let states: Vec<(String, String, i64, Option<String>)> =
        sqlx::query_as("SELECT item_id, state, tier, reason FROM backfill_items").fetch_all(&pool).await.unwrap();
    for (id, state, tier, reason) in &states {
        if id.parse::<i64>().unwrap() >= 10 {
            assert_eq!((state.as_str(), *tier, reason.as_deref()), ("rejected", 1, Some("too_long")), "item {id}");
        }
    }
    let fallback_calls: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM backfill_calls WHERE model = 'fake-fallback'").fetch_one(&pool).await.unwrap();
    assert!(fallback_calls > 0, "no call went to the fallback model");
    // The raw outputs of rejected items are kept, with the reason.
    let (raw, detail): (String, String) = sqlx::query_as(
        "SELECT raw, detail FROM backfill_outputs WHERE item_id = '17' AND status = 'rejected' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(raw.contains("Uitleg bij 17"), "{raw}");
    assert!(detail.contains("too_long"), "{detail}");
    // Written outputs record what post-processing changed.
    let detail: String = sqlx::query_scalar("SELECT detail FROM backfill_outputs WHERE item_id = '3' AND status = 'written'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(detail.contains("Uitleg bij"), "the strip change is recorded: {detail}");
    pool.close().await;

    let status = backfill_async(fx.dir.path(), &["status", fx.job.to_str().unwrap(), "--json"], &[]).await;
    let status: Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(status["rejected_by_reason"]["too_long"], 21, "{status}");
}
