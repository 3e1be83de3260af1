//! A private redis-server for tests that break it: started on a free port in a temp
//! dir with no persistence, and killed (SIGKILL), paused (SIGSTOP: a black-holed
//! Redis that accepts connections and never answers), resumed and restarted on the
//! same port at will.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary the tests run; override with `AI4FREE_TEST_REDIS_SERVER`.
fn binary() -> String {
    std::env::var("AI4FREE_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    paused: bool,
}

impl RedisServer {
    /// Starts a fresh server and waits until it answers PING.
    pub fn start() -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = RedisServer {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
            paused: false,
        };
        s.spawn();
        s
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: connections drop, nothing is saved.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.paused {
                self.signal(&c, "CONT");
                self.paused = false;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the kernel still accepts connections and buffers commands, but
    /// nothing is answered until [`RedisServer::resume`].
    pub fn pause(&mut self) {
        let c = self.child.as_ref().expect("server is running");
        self.signal(c, "STOP");
        self.paused = true;
    }

    /// SIGCONT.
    pub fn resume(&mut self) {
        let c = self.child.as_ref().expect("server is running");
        self.signal(c, "CONT");
        self.paused = false;
    }

    /// Kills the server if it runs, then starts an empty one on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A synchronous connection for inspecting or changing the server's state.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap()
    }

    /// Calls of `command` since start (or the last `CONFIG RESETSTAT`), from `INFO commandstats`.
    pub fn command_calls(&self, command: &str) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut self.connection())
            .unwrap();
        let prefix = format!("cmdstat_{}:calls=", command.to_ascii_lowercase());
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
    }

    fn spawn(&mut self) {
        let child = Command::new(binary())
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary()));
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let t = Instant::now();
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                let pong = redis::Client::open(self.url())
                    .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(500)))
                    .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
                if matches!(pong.as_deref(), Ok("PONG")) {
                    return;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "redis-server on port {} never answered",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, c: &Child, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(c.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sleeps, if needed, until the node's clock is at least `margin_ms` away from the
/// end of the current epoch-aligned window of `period_ms`, so a test that counts
/// requests in one window does not straddle two.
pub fn away_from_window_edge(period_ms: u64, margin_ms: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let left = period_ms - now % period_ms;
    if left < margin_ms {
        std::thread::sleep(Duration::from_millis(left + 5));
    }
}
