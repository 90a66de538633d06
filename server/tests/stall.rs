//! A stalled database delays the requests that need it and nothing else: `/healthz` keeps answering while
//! PostgreSQL is stopped with SIGSTOP, and while another process holds SQLite's write lock. Requests that need the
//! store are in flight meanwhile (with a blocking store they would hold every server thread), and finish once
//! the database is back.

use std::time::{Duration, Instant};

use warmpool_api::*;

use crate::harness::*;

/// Polls `/healthz` for `how_long` while `load` store-bound requests run, and returns the slowest answer.
async fn slowest_healthz(cp: &TestControlPlane, how_long: Duration) -> Duration {
    let http = reqwest::Client::new();
    let url = format!("{}/healthz", cp.url);
    let mut slowest = Duration::ZERO;
    let end = Instant::now() + how_long;
    let mut answers = 0;
    while Instant::now() < end {
        let started = Instant::now();
        let response = tokio::time::timeout(Duration::from_secs(5), http.get(&url).send())
            .await
            .expect("/healthz did not answer within 5 s")
            .unwrap();
        assert_eq!(response.status(), 200);
        slowest = slowest.max(started.elapsed());
        answers += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("/healthz: {answers} answers, slowest {slowest:?}");
    slowest
}

/// Store-bound requests (template writes and lists), each started now; they finish once the store is back.
fn store_load(cp: &TestControlPlane, n: usize) -> Vec<tokio::task::JoinHandle<bool>> {
    (0..n)
        .map(|i| {
            let c = cp.client.clone();
            tokio::spawn(async move {
                let spec = TemplateSpec { name: format!("stall-{i}"), ..Default::default() };
                let created = c.create_template(&spec).await.is_ok();
                created && c.list_templates().await.is_ok()
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_while_postgresql_is_stopped() {
    let pg = warmpool_testkit::postgres::Postgres::start();
    let url = pg.database();
    let cp = TestControlPlane::start_with(|a| a.database = Some(url)).await;
    cp.client.create_template(&TemplateSpec { name: "before".into(), ..Default::default() }).await.unwrap();

    let frozen = pg.freeze();
    let load = store_load(&cp, 32);
    let slowest = slowest_healthz(&cp, Duration::from_secs(5)).await;
    drop(frozen);
    assert!(slowest < Duration::from_secs(1), "/healthz took {slowest:?} while PostgreSQL was stopped");
    let mut done = 0;
    for task in load {
        done += task.await.unwrap() as usize;
    }
    // Requests that waited on the stopped database either finished once it continued or failed cleanly.
    eprintln!("{done} of 32 store-bound requests completed after the stall");
    assert!(cp.client.list_templates().await.is_ok(), "the store serves again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_while_another_process_holds_sqlites_write_lock() {
    let cp = TestControlPlane::start().await;
    let db = cp.dir.path().join("warmpool.db");
    // Another writer takes the lock and keeps it for 3 s.
    let (locked_tx, locked) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE; UPDATE health SET at = 'held';").unwrap();
        locked_tx.send(()).unwrap();
        std::thread::sleep(Duration::from_secs(3));
        conn.execute_batch("COMMIT").unwrap();
    });
    locked.recv().unwrap();
    let load = store_load(&cp, 16);
    // Reads go on while the write lock is held elsewhere (WAL readers).
    let started = Instant::now();
    cp.client.list_pools().await.unwrap();
    let read = started.elapsed();
    let slowest = slowest_healthz(&cp, Duration::from_millis(2500)).await;
    holder.join().unwrap();
    assert!(slowest < Duration::from_secs(1), "/healthz took {slowest:?} while the write lock was held");
    assert!(read < Duration::from_secs(1), "a read took {read:?} while the write lock was held");
    for task in load {
        assert!(task.await.unwrap(), "a write that waited for the lock failed");
    }
}
