//! The Redis side of the limits, as data: the embedded Lua script, the one function
//! that names Redis keys, the `EVALSHA` command builder and the reply parser. No IO.
//!
//! Key names are a stable API (renaming them forgets every live count):
//! `a4f:{<key_id>}:<kind>:<period>`, with kind `rq` for requests (issue 5 adds
//! token and spend kinds) and period `1s`, `1m`, `1h` or `1d`. The braces are a
//! Redis Cluster hash tag: all windows of one API key live in one slot, so one
//! script call can touch them all.

use std::io::Write;

use redis::{Cmd, RedisWrite, ToRedisArgs, Value};

use super::Window;

/// `lua/windows.lua`: checks and counts all of a key's windows atomically.
pub const WINDOWS_LUA: &str = include_str!("../../lua/windows.lua");

/// Most windows one call may carry (4 request windows today; room for token and
/// spend windows).
pub const MAX_WINDOWS: usize = 8;

/// What is being counted in a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Requests (cost 1 each).
    Requests,
}

impl Kind {
    const fn tag(self) -> &'static str {
        match self {
            Kind::Requests => "rq",
        }
    }
}

/// The Redis key of one window of one API key; written straight into the command
/// buffer, never allocated on its own.
#[derive(Debug, Clone, Copy)]
pub struct WindowKey<'a> {
    /// The API key's public id.
    pub key_id: &'a str,
    /// What is counted.
    pub kind: Kind,
    /// Which window.
    pub window: Window,
}

impl std::fmt::Display for WindowKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a4f:{{{}}}:{}:{}",
            self.key_id,
            self.kind.tag(),
            self.window.key_suffix()
        )
    }
}

impl ToRedisArgs for WindowKey<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + RedisWrite,
    {
        // Writing into a Vec-backed buffer cannot fail.
        let _ = write!(out.writer_for_next_arg(), "{self}");
    }
}

/// One window of a script call.
#[derive(Debug, Clone, Copy)]
pub struct WindowArg<'a> {
    /// Its key.
    pub key: WindowKey<'a>,
    /// Its limit.
    pub limit: u64,
    /// What this call adds when admitted.
    pub cost: u64,
}

/// `EVALSHA <sha> <n> <keys…> <deadline_us> (<period_ms> <limit> <cost>)…`.
pub fn check_cmd<'a>(
    sha: &str,
    deadline_us: u64,
    windows: impl Iterator<Item = WindowArg<'a>> + Clone,
) -> Cmd {
    let n = windows.clone().count();
    // Sized so the buffer is allocated once: ~40 bytes per key, ~30 per triple.
    let mut cmd = Cmd::with_capacity(4 + 4 * n, 80 + 72 * n);
    cmd.arg("EVALSHA").arg(sha).arg(n);
    for w in windows.clone() {
        cmd.arg(w.key);
    }
    cmd.arg(deadline_us);
    for w in windows {
        cmd.arg(w.key.window.period_ms()).arg(w.limit).arg(w.cost);
    }
    cmd
}

/// How the script decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Counted in every window.
    Admitted,
    /// Counted nowhere: at least one window was full.
    Refused,
    /// Ran after the caller's deadline: counted nowhere.
    Stale,
}

/// The script's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The decision.
    pub status: Status,
    /// Redis time when the script ran, Unix µs.
    pub now_us: u64,
    /// Per window in call order: (window start Unix ms, amount counted).
    pub windows: [(u64, u64); MAX_WINDOWS],
    /// How many entries of `windows` are set.
    pub len: usize,
}

impl Reply {
    /// Redis time when the script ran, Unix ms.
    pub fn now_ms(&self) -> u64 {
        self.now_us / 1_000
    }

    /// (start, amount) of each window, in call order.
    pub fn windows(&self) -> &[(u64, u64)] {
        &self.windows[..self.len]
    }
}

/// A reply that does not have the script's shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected reply from windows.lua: {0}")]
pub struct ReplyError(&'static str);

/// Parses the script's reply to a call with `n` windows.
pub fn parse_reply(v: &Value, n: usize) -> Result<Reply, ReplyError> {
    let Value::Array(items) = v else {
        return Err(ReplyError("not an array"));
    };
    let int = |i: usize| -> Result<i64, ReplyError> {
        match items.get(i) {
            Some(Value::Int(x)) => Ok(*x),
            Some(_) => Err(ReplyError("not an integer")),
            None => Err(ReplyError("too short")),
        }
    };
    let uint = |i: usize| u64::try_from(int(i)?).map_err(|_| ReplyError("negative value"));
    let status = match int(0)? {
        1 => Status::Admitted,
        0 => Status::Refused,
        -1 => Status::Stale,
        _ => return Err(ReplyError("unknown status")),
    };
    let now_us = uint(1)?;
    let mut reply = Reply {
        status,
        now_us,
        windows: [(0, 0); MAX_WINDOWS],
        len: 0,
    };
    if status == Status::Stale {
        return Ok(reply);
    }
    if n > MAX_WINDOWS {
        return Err(ReplyError("too many windows"));
    }
    if items.len() != 2 + 2 * n {
        return Err(ReplyError("wrong number of windows"));
    }
    for i in 0..n {
        reply.windows[i] = (uint(2 + 2 * i)?, uint(3 + 2 * i)?);
    }
    reply.len = n;
    Ok(reply)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn args(cmd: &Cmd) -> Vec<String> {
        cmd.args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8(b.to_vec()).unwrap(),
                _ => "<other>".into(),
            })
            .collect()
    }

    fn key(window: Window) -> WindowKey<'static> {
        WindowKey {
            key_id: "Zx81kQ2mP0aB",
            kind: Kind::Requests,
            window,
        }
    }

    #[test]
    fn key_names_are_stable_and_share_a_hash_tag() {
        assert_eq!(key(Window::Minute).to_string(), "a4f:{Zx81kQ2mP0aB}:rq:1m");
        assert_eq!(key(Window::Day).to_string(), "a4f:{Zx81kQ2mP0aB}:rq:1d");
    }

    #[test]
    fn command_lists_keys_then_the_deadline_then_triples() {
        let windows = [
            WindowArg {
                key: key(Window::Second),
                limit: 5,
                cost: 1,
            },
            WindowArg {
                key: key(Window::Hour),
                limit: 1000,
                cost: 1,
            },
        ];
        let cmd = check_cmd("abc123", 1_700_000_000_020_000, windows.iter().copied());
        assert_eq!(
            args(&cmd),
            [
                "EVALSHA",
                "abc123",
                "2",
                "a4f:{Zx81kQ2mP0aB}:rq:1s",
                "a4f:{Zx81kQ2mP0aB}:rq:1h",
                "1700000000020000",
                "1000",
                "5",
                "1",
                "3600000",
                "1000",
                "1",
            ]
        );
    }

    #[test]
    fn script_is_embedded_and_documented() {
        assert!(WINDOWS_LUA.contains("redis.call('TIME')"));
        assert!(WINDOWS_LUA.contains("PEXPIRE"));
        // Key names come from KEYS only.
        assert!(
            !WINDOWS_LUA.contains("..'"),
            "no key names built in the script"
        );
    }

    #[test]
    fn replies_parse() {
        let ints = |v: &[i64]| Value::Array(v.iter().map(|x| Value::Int(*x)).collect());
        let r = parse_reply(&ints(&[1, 1_700_000_000_123_456, 1_700_000_000_000, 3]), 1).unwrap();
        assert_eq!(r.status, Status::Admitted);
        assert_eq!(r.now_ms(), 1_700_000_000_123);
        assert_eq!(r.windows(), [(1_700_000_000_000, 3)]);
        let r = parse_reply(&ints(&[0, 5, 0, 10, 0, 7]), 2).unwrap();
        assert_eq!(r.status, Status::Refused);
        assert_eq!(r.windows(), [(0, 10), (0, 7)]);
        let r = parse_reply(&ints(&[-1, 5]), 2).unwrap();
        assert_eq!(r.status, Status::Stale);
        assert!(r.windows().is_empty());
        for (bad, n) in [
            (ints(&[1, 5, 0]), 1),
            (ints(&[1, 5, 0, 1, 0, 1]), 1),
            (ints(&[2, 5]), 0),
            (ints(&[1, -5]), 0),
            (ints(&[1, 5, 0, -1]), 1),
            (Value::Int(1), 0),
            (Value::Array(vec![Value::Int(1), Value::Nil]), 0),
            (ints(&[1]), 0),
            (ints(&[1, 5]), MAX_WINDOWS + 1),
        ] {
            assert!(parse_reply(&bad, n).is_err(), "{bad:?}");
        }
    }
}
