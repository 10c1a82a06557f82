use crate::common::*;
use std::collections::HashSet;

/// 256 requests in flight at once (the fake holds every answer until all 256 have arrived):
/// all served, each metered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_hundreds_of_concurrent_streams() {
    const N: usize = 256;
    let fake = FakeUpstream::start(Behavior {
        chunks: 5,
        gate_in_flight: Some(N),
        ..Behavior::default()
    })
    .await
    .unwrap();
    let proxy = start("load", &[("pool-a", &fake.base_url(), "sk-a")], "");
    let c = client();

    let url = format!("{}/chat/completions", proxy.base_url());
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let c = c.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let resp = c
                    .post(&url)
                    .bearer_auth(KEY)
                    .json(&chat_body("gpt-test", i % 2 == 0))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
                let id = request_id(&resp);
                let text = resp.text().await.unwrap();
                assert!(text.contains("tok4"));
                id
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap());
    }
    assert_eq!(ids.len(), N);
    // Every stream was open at the upstream at the same time.
    assert_eq!(fake.peak_in_flight(), N);
    let records = proxy.usage_records();
    assert_eq!(records.len(), N);
    let recorded: HashSet<String> = records
        .iter()
        .map(|r| r["request_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(recorded, ids);
    assert!(records
        .iter()
        .all(|r| usage_of(r) == Behavior::default().usage));
}
