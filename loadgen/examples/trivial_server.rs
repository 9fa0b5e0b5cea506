//! A trivial HTTP server for loadgen's own benchmark: answers every POST with a short JSON body,
//! so the server costs as little as possible and the generator's limits show.
//!
//! `cargo run --release -p loadgen --example trivial_server -- 127.0.0.1:9100 [threads]`

use axum::routing::post;
use axum::Router;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:9100".into());
    let threads: usize = args.get(2).and_then(|t| t.parse().ok()).unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let app = Router::new().fallback(post(|| async { "{\"ok\":true}" }));
        let l = tokio::net::TcpListener::bind(&addr).await.expect("bind");
        println!("listening on http://{}", l.local_addr().expect("addr"));
        axum::serve(l, app).await.expect("serve");
    });
}
