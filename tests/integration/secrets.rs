//! Secrets: the API key never appears in output, logs or the database.

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn the_api_key_is_sent_but_never_printed_logged_or_stored() {
    let key = "sk-test-7f3a9c1e5b2d4f6a8c0e";
    let fx = Fixture::new(25).await;
    let fake = FakeProvider::start(vec![Reply::ServerError(500), Reply::Malformed], vec![], 31).await;
    fx.write_job(&fake.base_url(), "", "", "");
    let job = fx.job.to_str().unwrap();
    let output = backfill_async(fx.dir.path(), &["run", job, "--json"], &[("OPENAI_API_KEY", key), ("RUST_LOG", "trace")]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(fake.records().iter().all(|r| r.authorization.as_deref() == Some(&format!("Bearer {key}"))));
    assert!(!stdout(&output).contains(key), "key on stdout");
    assert!(!stderr(&output).contains(key), "key on stderr (RUST_LOG=trace)");
    let status = backfill_async(fx.dir.path(), &["status", job, "--json"], &[("OPENAI_API_KEY", key)]).await;
    assert!(!stdout(&status).contains(key) && !stderr(&status).contains(key));
    for entry in std::fs::read_dir(fx.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.windows(key.len()).any(|w| w == key.as_bytes()), "key stored in {}", path.display());
    }
}
