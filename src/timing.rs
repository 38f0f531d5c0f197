//! Fixed waits of the daemon's lifetime (shutdown, teardown, describing sessions), in one place; what users tune is in the config instead.

use std::time::Duration;

/// While draining: how often the daemon looks whether running commands finished.
pub const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Shutdown: destroying every session may take `kill_grace` plus this.
pub const SHUTDOWN_DESTROY_SLACK: Duration = Duration::from_secs(10);

/// Shutdown: how long connections get to flush the answers in flight and close.
pub const CONNECTIONS_FLUSH: Duration = Duration::from_secs(3);

/// Shutdown: how long one connection waits for its requests in flight to answer.
pub const IN_FLIGHT_FLUSH: Duration = Duration::from_secs(2);

/// Shutdown: how long one connection's writer may take to write what is queued.
pub const WRITER_FLUSH: Duration = Duration::from_secs(2);

/// How long stopping the actor tree may take.
pub const ROOT_STOP: Duration = Duration::from_secs(2);

/// A destroyed session whose commands have not ended after `kill_grace` plus
/// this stops anyway (its Drop guards still kill everything).
pub const FORCE_END_SLACK: Duration = Duration::from_secs(5);

/// How long a session may take to describe itself (`session.list`, registry recovery).
pub const DESCRIBE: Duration = Duration::from_secs(1);

/// How long a refused connection (PERMISSION_DENIED, TOO_MANY_CONNECTIONS,
/// FRAME_TOO_LARGE) lingers after its error frame, reading what the client
/// still sends, before it closes; the error frame's write counts in it.
pub const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// After a failed `accept` (EMFILE and friends): back off instead of spinning.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// uid-per-session: before a uid is reused, its processes get SIGKILL and
/// /proc is checked again, every this long…
pub const UID_KILL_POLL: Duration = Duration::from_millis(10);

/// …at most this many times; a uid whose processes are still alive then is
/// held back from the pool until a later cleanup succeeds.
pub const UID_KILL_ROUNDS: u32 = 200;

/// How long after a command's end its output keeps the window of its last
/// bytes (for a streaming reader that has not read them yet) before it is cut
/// to what the result keeps.
pub const TRIM_AFTER_END: Duration = Duration::from_millis(500);

/// How long `session.create` waits for its `cwd` to be stat'ed (a path on a
/// stalled mount): the connection reads its next frame only after it.
pub const CWD_CHECK: Duration = Duration::from_secs(5);
