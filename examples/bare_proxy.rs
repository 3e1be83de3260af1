//! The benchmarks' denominator: a Pingora `ProxyHttp` with nothing but `upstream_peer`.
//!
//! Same Pingora version, features and thread count as the gateway, no logic at all,
//! so `gateway / bare` isolates what ai4free itself costs.
//!
//! `cargo run --release --example bare_proxy -- --listen 127.0.0.1:8180 --upstream 127.0.0.1:9090 --threads 2`

use std::net::SocketAddr;

use async_trait::async_trait;
use clap::Parser;
use pingora::prelude::{HttpPeer, Session};
use pingora::proxy::{http_proxy_service_with_name, ProxyHttp};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};

// Same allocator as the gateway binary, so the comparison isolates ai4free's logic.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8180")]
    listen: SocketAddr,
    #[arg(long)]
    upstream: SocketAddr,
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

struct Bare {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    let args = Args::parse();
    let conf = ServerConf {
        threads: args.threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        upstream_keepalive_pool_size: 256,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut svc = http_proxy_service_with_name(
        &server.configuration,
        Bare {
            upstream: args.upstream,
        },
        "bare",
    );
    svc.add_tcp(&args.listen.to_string());
    server.add_service(svc);
    eprintln!("bare pingora proxy on {} -> {}", args.listen, args.upstream);
    server.run(RunArgs::default());
}
