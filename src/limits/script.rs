//! The Redis side of the limits, as data: the embedded Lua script, the one function
//! that names Redis keys, the `EVALSHA` command builder and the reply parser. No IO.
//!
//! Key names are a stable API (renaming them forgets every live count):
//! `a4f:{<key_id>}:<kind>:<period>`, with kind `rq` (requests), `tk` (tokens) or
//! `usd` (nano-USD) and period `1s`, `1m`, `1h`, `1d` or `mo` (UTC calendar
//! month), plus `a4f:{<key_id>}:cc`, the ZSET of concurrency leases. The braces
//! are a Redis Cluster hash tag: everything of one API key lives in one slot, so
//! one script call can touch it all.

use std::io::Write;

use redis::{Cmd, RedisWrite, ToRedisArgs, Value};

use super::policy::{Limit, Span};

/// `lua/windows.lua`: checks and reserves all of a key's limits (and its
/// concurrency lease) atomically.
pub const WINDOWS_LUA: &str = include_str!("../../lua/windows.lua");

/// `lua/settle.lua`: adjusts reservations to what was used and releases a lease.
pub const SETTLE_LUA: &str = include_str!("../../lua/settle.lua");

/// Most entries one call may carry: eight counted limits and a lease.
pub const MAX_WINDOWS: usize = 9;

/// The Redis key of one counted limit of one API key; written straight into the
/// command buffer, never allocated on its own.
#[derive(Debug, Clone, Copy)]
pub struct CounterKey<'a> {
    /// The API key's public id.
    pub key_id: &'a str,
    /// Which limit.
    pub limit: Limit,
}

impl std::fmt::Display for CounterKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a4f:{{{}}}:{}", self.key_id, self.limit.key_tag())
    }
}

impl ToRedisArgs for CounterKey<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + RedisWrite,
    {
        // Writing into a Vec-backed buffer cannot fail.
        let _ = write!(out.writer_for_next_arg(), "{self}");
    }
}

/// The Redis key of an API key's concurrency leases (a ZSET: member = request id,
/// score = expiry in Redis ms).
#[derive(Debug, Clone, Copy)]
pub struct LeaseKey<'a>(pub &'a str);

impl std::fmt::Display for LeaseKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a4f:{{{}}}:cc", self.0)
    }
}

impl ToRedisArgs for LeaseKey<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + RedisWrite,
    {
        let _ = write!(out.writer_for_next_arg(), "{self}");
    }
}

/// One counted limit of an admission call.
#[derive(Debug, Clone, Copy)]
pub struct WindowArg<'a> {
    /// Its key.
    pub key: CounterKey<'a>,
    /// Its value.
    pub limit: u64,
    /// What this call reserves when admitted.
    pub cost: u64,
}

/// The concurrency lease of an admission call.
#[derive(Debug, Clone, Copy)]
pub struct LeaseArg<'a> {
    /// The API key's public id.
    pub key_id: &'a str,
    /// `max_concurrent`.
    pub max: u64,
    /// Lease lifetime unless renewed, ms.
    pub ttl_ms: u64,
    /// The lease's member (the request id).
    pub member: &'a str,
}

fn span_arg(cmd: &mut Cmd, span: Span) {
    match span {
        Span::Fixed(ms) => cmd.arg(ms),
        Span::Month => cmd.arg("month"),
    };
}

/// `EVALSHA <sha> <n> <keys…> [<lease key>] <deadline_us> <member>
/// (<span> <limit> <cost>)… ['lease' <max> <ttl_ms>]`.
pub fn check_cmd<'a>(
    sha: &str,
    deadline_us: u64,
    windows: impl Iterator<Item = WindowArg<'a>> + Clone,
    lease: Option<LeaseArg<'a>>,
) -> Cmd {
    let n = windows.clone().count() + usize::from(lease.is_some());
    // Sized so the buffer is allocated once: ~40 bytes per key, ~30 per triple.
    let mut cmd = Cmd::with_capacity(5 + 4 * n, 100 + 72 * n);
    cmd.arg("EVALSHA").arg(sha).arg(n);
    for w in windows.clone() {
        cmd.arg(w.key);
    }
    if let Some(l) = &lease {
        cmd.arg(LeaseKey(l.key_id));
    }
    cmd.arg(deadline_us).arg(lease.map_or("", |l| l.member));
    for w in windows {
        span_arg(&mut cmd, w.key.limit.span());
        cmd.arg(w.limit).arg(w.cost);
    }
    if let Some(l) = lease {
        cmd.arg("lease").arg(l.max).arg(l.ttl_ms);
    }
    cmd
}

/// One adjustment of a settlement: `delta` to the window that started at `start`.
#[derive(Debug, Clone, Copy)]
pub struct SettleArg<'a> {
    /// The counter.
    pub key: CounterKey<'a>,
    /// The window the reservation was counted in (Unix ms).
    pub start: u64,
    /// Actual − reserved.
    pub delta: i64,
}

/// `EVALSHA <sha> <n> <keys…> [<lease key>] <deadline_us> <member> (<start> <delta>)…`.
pub fn settle_cmd(
    sha: &str,
    deadline_us: u64,
    adjust: &[SettleArg<'_>],
    lease: Option<(&str, &str)>,
) -> Cmd {
    let n = adjust.len() + usize::from(lease.is_some());
    let mut cmd = Cmd::with_capacity(5 + 3 * n, 100 + 64 * n);
    cmd.arg("EVALSHA").arg(sha).arg(n);
    for a in adjust {
        cmd.arg(a.key);
    }
    if let Some((key_id, _)) = lease {
        cmd.arg(LeaseKey(key_id));
    }
    cmd.arg(deadline_us).arg(lease.map_or("", |(_, m)| m));
    for a in adjust {
        cmd.arg(a.start).arg(a.delta);
    }
    cmd
}

/// A pipeline pushing the expiry of live leases to `expires_ms` (Redis time) and
/// keeping each lease set alive as long; a lease that already expired stays gone.
pub fn renew_pipe<'a>(
    leases: impl Iterator<Item = (&'a str, &'a str)>,
    expires_ms: u64,
    ttl_ms: u64,
) -> redis::Pipeline {
    let mut p = redis::pipe();
    for (key_id, member) in leases {
        p.cmd("ZADD")
            .arg(LeaseKey(key_id))
            .arg("XX")
            .arg(expires_ms)
            .arg(member)
            .ignore();
        p.cmd("PEXPIRE").arg(LeaseKey(key_id)).arg(ttl_ms).ignore();
    }
    p
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

    fn key(limit: Limit) -> CounterKey<'static> {
        CounterKey {
            key_id: "Zx81kQ2mP0aB",
            limit,
        }
    }

    #[test]
    fn key_names_are_stable_and_share_a_hash_tag() {
        assert_eq!(
            key(Limit::RequestsPerMinute).to_string(),
            "a4f:{Zx81kQ2mP0aB}:rq:1m"
        );
        assert_eq!(
            key(Limit::RequestsPerDay).to_string(),
            "a4f:{Zx81kQ2mP0aB}:rq:1d"
        );
        assert_eq!(
            key(Limit::TokensPerMinute).to_string(),
            "a4f:{Zx81kQ2mP0aB}:tk:1m"
        );
        assert_eq!(
            key(Limit::SpendPerMonth).to_string(),
            "a4f:{Zx81kQ2mP0aB}:usd:mo"
        );
        assert_eq!(
            LeaseKey("Zx81kQ2mP0aB").to_string(),
            "a4f:{Zx81kQ2mP0aB}:cc"
        );
    }

    #[test]
    fn command_lists_keys_then_the_deadline_then_triples() {
        let windows = [
            WindowArg {
                key: key(Limit::RequestsPerSecond),
                limit: 5,
                cost: 1,
            },
            WindowArg {
                key: key(Limit::SpendPerMonth),
                limit: 1000,
                cost: 7,
            },
        ];
        let cmd = check_cmd(
            "abc123",
            1_700_000_000_020_000,
            windows.iter().copied(),
            None,
        );
        assert_eq!(
            args(&cmd),
            [
                "EVALSHA",
                "abc123",
                "2",
                "a4f:{Zx81kQ2mP0aB}:rq:1s",
                "a4f:{Zx81kQ2mP0aB}:usd:mo",
                "1700000000020000",
                "",
                "1000",
                "5",
                "1",
                "month",
                "1000",
                "7",
            ]
        );
        let lease = LeaseArg {
            key_id: "Zx81kQ2mP0aB",
            max: 3,
            ttl_ms: 30_000,
            member: "req_1",
        };
        let cmd = check_cmd("abc", 0, windows[..1].iter().copied(), Some(lease));
        assert_eq!(
            args(&cmd),
            [
                "EVALSHA",
                "abc",
                "2",
                "a4f:{Zx81kQ2mP0aB}:rq:1s",
                "a4f:{Zx81kQ2mP0aB}:cc",
                "0",
                "req_1",
                "1000",
                "5",
                "1",
                "lease",
                "3",
                "30000",
            ]
        );
        let adjust = [SettleArg {
            key: key(Limit::TokensPerDay),
            start: 86_400_000,
            delta: -40,
        }];
        let cmd = settle_cmd("def", 9, &adjust, Some(("Zx81kQ2mP0aB", "req_1")));
        assert_eq!(
            args(&cmd),
            [
                "EVALSHA",
                "def",
                "2",
                "a4f:{Zx81kQ2mP0aB}:tk:1d",
                "a4f:{Zx81kQ2mP0aB}:cc",
                "9",
                "req_1",
                "86400000",
                "-40",
            ]
        );
    }

    #[test]
    fn script_is_embedded_and_documented() {
        for lua in [WINDOWS_LUA, SETTLE_LUA] {
            assert!(lua.contains("redis.call('TIME')"));
            // Key names come from KEYS only.
            assert!(!lua.contains("..'"), "no key names built in the script");
        }
        assert!(WINDOWS_LUA.contains("PEXPIRE"));
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
