//! The SQLite ledger writer: one write connection commits the
//! per-request writes (reservations, settlements, request rows, daily
//! quota units) in batches, one transaction per batch ("group commit").
//! Two threads take turns with it, one at a time: a quiet one at a low
//! priority, and a catch-up one for when the quiet one falls behind (see
//! [`BACKGROUND_NICE`]).
//!
//! Why: through sqlx every statement is a round trip to its SQLite worker
//! thread, and a settlement is eight of them; the thread hand-offs and a
//! commit per write cost more CPU than the writes themselves.
//!
//! What each caller is promised:
//! - A reservation is decided at once, against the committed balance
//!   minus committed open reservations minus the reservations this writer
//!   granted and has not written ("held").
//! - Most reservations do not even reach the thread: each exact decision
//!   publishes the user's remaining headroom, and later reservations that
//!   fit in it are granted on the caller's thread (a lock and a push).
//!   The headroom only shrinks until the next exact decision, which runs
//!   when a reservation does not fit (after a top-up, say). Headroom
//!   carries an epoch: a fast grant the writer had not taken when it
//!   published a newer headroom is taken off that one too, so nothing is
//!   granted twice. An exact decision counts the grants made while it read
//!   the database and publishes under the same lock, so no grant slips
//!   between what it counted and what it publishes.
//! - A reservation's row is written only once it has been open for
//!   [`HOLD_UNWRITTEN`]: a request that settles or is released sooner (nearly
//!   all of them) never writes one, and its settlement is the only write.
//!   Until then the writer's own tally holds the funds. A crash loses only
//!   unwritten reservations of requests that never settled, which recovery
//!   would have released anyway.
//! - Settlements and releases are answered after their commit. They wait
//!   up to [`LINGER`] for company (nobody holds a client's reply on them),
//!   so at any load a commit carries several requests. They reach the
//!   thread through a list the thread takes when the batch closes, so only
//!   the first of a batch wakes it. A finished request's settlement and
//!   row are usually detached ([`Writer::detach`]): nobody waits for that
//!   answer, so a commit wakes no task for it.
//! - Daily quota units and recovery are committed before the answer.
//!
//! A failing operation undoes only itself (the batch is run again with a
//! savepoint per operation when one fails). The queue is bounded: callers
//! wait when it is full, and the API turns requests away meanwhile, or
//! once one commit has held the writer for [`STUCK_AFTER`] with work
//! waiting ([`Writer::backlogged`]). The writer copies the write-ahead
//! log into the database file itself, between two batches, every
//! [`CHECKPOINT_EVERY`], and truncates it when it has grown past
//! [`WAL_LIMIT`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::borrow::Cow;

use rusqlite::{params_from_iter, Connection, OpenFlags, OptionalExtension, Statement};
use tokio::sync::oneshot;

use crate::ledger::Settlement;
use crate::sql::{self, Stmt};
use crate::{now_ms, RequestRecord, Result, StoreError};
use sluice_proto::machine::{MachineTicks, ThreadTicks};

/// Operations waiting for the writer, at most: in its queue, and again in
/// the list of lingering settlements and releases. What the API keeps in
/// memory while one slow commit holds the writer, before it turns
/// requests away: the two hold about two seconds of requests at 16,000 a
/// second (see [`STUCK_AFTER`]; a queued settlement with its request's
/// row is about a kilobyte, so both full hold about 32 MB). At 4,096,
/// half a second's worth at the gateway benchmark's rate, slow disk
/// flushes on the sixteenth machine turned thousands of requests away
/// (docs/benchmarks-history.md).
const QUEUE: usize = 16_384;
/// A batch this long commits without waiting for its deadline (the
/// lingering operations taken at once may make it longer; they are at most
/// [`QUEUE`]).
const BATCH: usize = 256;
/// How long a batch of settlements and releases waits for company before
/// its commit.
const LINGER: Duration = Duration::from_millis(10);
/// How long a granted reservation may stay without a row.
const HOLD_UNWRITTEN: Duration = Duration::from_secs(1);
/// Items between two yields of the CPU in a batch. A batch of a hundred
/// settlements is about a millisecond of work; a request thread woken on
/// this core would otherwise wait for the scheduler to preempt the writer
/// (the 95th percentile latency at concurrency 1 went from 0.7 to 0.3 ms).
/// Only the quiet thread yields (see [`BACKGROUND_NICE`]).
const YIELD_EVERY: usize = 2;
/// Accounts per balance statement at the end of a batch.
const DELTAS_PER_STATEMENT: usize = 200;
/// The nice value of the quiet writer thread (0 is the default; higher
/// yields more readily). A batch is up to a millisecond of work, and its
/// commit a stretch of 0.15–0.26 ms that never yields (about 70 writes of
/// the log); a request thread woken on that core waits it out unless the
/// scheduler preempts the writer, which
/// it does sooner the lower the writer's weight. Measured with `sluice
/// bench gateway --no-litellm`: on the twelfth machine (three interleaved
/// pairs) Sluice's added p99 at c=1 was 0.204, 0.233 and 0.233 ms against
/// 0.309, 0.279 and 0.316 at 5; on the thirteenth 0.26–0.31 against
/// 1.6–1.7 ms at 5 or 0.
///
/// At 19 the thread gets about 1.5% of a core that other work keeps busy,
/// and its yields (see [`YIELD_EVERY`]) hand that work a whole time slice
/// each: it would settle a few requests per slice of the other work. So
/// when it falls behind ([`HAND_OVER_AT`], [`QUIET_BATCH_LIMIT`]) it
/// hands the connection to a second thread at the default priority that
/// never yields, which writes until it has kept up for [`CATCH_UP_HOLD`]
/// with the cores idle at times ([`MIN_IDLE_PCT`]) and its own CPU not
/// crowded ([`MAX_WAIT_PER_RUN`]), and hands it back.
const BACKGROUND_NICE: i32 = 19;
/// Operations waiting (in the batch about to commit, the queue and the
/// lingering list) from which the quiet writer thread hands the connection
/// to the catch-up thread: before it commits that batch, or during the
/// commit (rolled back, after a yield). Under `wrk -c32` on the
/// thirteenth machine, with no other work, the quiet thread crossed 1,024
/// waiting 21 times in 15 s (and caught up by itself), 2,048 11 times.
/// (Half the queue until the queue grew from 4,096 to [`QUEUE`].)
const HAND_OVER_AT: usize = 2048;
/// Once its queue was full, the writer counts as backlogged (see
/// [`Writer::backlogged`]) until no more than this waits in the queue.
/// Without the margin, the writer taking its next batch (up to [`BATCH`])
/// from a full queue let a request in that then waited for a writer held
/// up by a lock: the test `ledger_backlog` failed in 2 of 6 runs beside two
/// busy loops on the fifteenth machine and 3 of 12 on the sixteenth (0 of
/// 32 with the margin).
const BACKLOG_CLEARS_AT: usize = QUEUE / 2;
/// How long one commit (with the checkpoint after it) may hold the writer,
/// with operations waiting, before the writer counts as backlogged (see
/// [`Writer::backlogged`]) even though its queue is not full: at low rates
/// finished requests then wait in memory for their commit about this long
/// at most, not for as long as the queue would take to fill. A disk flush
/// can hold a commit for a second or more on a VM whose vCPUs never idle
/// (measured on the sixteenth machine: 90th percentile 26 ms, longest 588
/// ms and 1.02 s, once 6 s): the queue rides out the shorter ones.
const STUCK_AFTER: Duration = Duration::from_secs(2);
/// A batch the quiet thread has been committing for this long (wall time)
/// goes to the catch-up thread too (rolled back, after a yield). Its work
/// is a millisecond or two; it takes this long only when other work keeps
/// the thread off the cores.
const QUIET_BATCH_LIMIT: Duration = Duration::from_millis(50);
/// The catch-up thread hands the connection back once it has not been
/// behind for this long, the cores were idle for at least
/// [`MIN_IDLE_PCT`] of it, and it waited for its own CPU less than
/// [`MAX_WAIT_PER_RUN`]: the quiet thread lives on idle time.
const CATCH_UP_HOLD: Duration = Duration::from_millis(250);
/// See [`CATCH_UP_HOLD`] (all cores' time, in percent, from `/proc/stat`;
/// where there is none the hold alone decides).
const MIN_IDLE_PCT: f64 = 5.0;
/// See [`CATCH_UP_HOLD`]: the catch-up thread's time runnable but waiting
/// for a CPU per time running (`/proc/thread-self/schedstat`), about the
/// number of other threads of its priority it shared its CPU with. The
/// machine's idle time alone misses work that keeps only the writer's
/// CPU busy (affinity, cpusets): the other core idles, the quiet thread
/// starves again, and the two cycled (13–17 hand-overs in 1.5 s in
/// `writer_share`). Measured on the fourteenth machine over 10 s of `wrk
/// -c32`: 0.36 alone (the request threads 0.39–0.40), 1.52 with two busy
/// loops beside it; pinned beside one busy loop about 1. With the whole
/// gateway pinned to one core it is 1.22–1.32: there the quiet thread fell
/// behind 57–61 times in 13 s, and the catch-up thread now keeps writing
/// (the same throughput).
const MAX_WAIT_PER_RUN: f64 = 0.75;
/// How often the writer copies the write-ahead log into the database file
/// (a PASSIVE checkpoint on its own connection, between two batches; see
/// [`State::maintain`]), and looks at the log's size. Between batches no
/// write is in the way, so the copy is complete unless a reader of an
/// older snapshot holds it back, and SQLite then starts the log again from
/// its beginning at the next commit: the log stays at what a quarter of a
/// second writes, and its file is overwritten rather than appended to.
/// Until the fifteenth machine a thread of its own checkpointed every half
/// second on a second connection; under load its copy was never complete
/// when a commit began (the writer commits every 10 ms), so the log never
/// restarted: it grew by 11.5 MB a second at c=1 and 18–22 MB at c=32 and
/// was copied and truncated at [`WAL_LIMIT`] every few seconds, every frame
/// appended to a file just emptied (dearer than overwriting: 2.1 µs a
/// frame against 1.5 there).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// A write-ahead log past this size is copied in full and truncated by the
/// writer ([`bound_wal`]): readers of older snapshots can keep the log from
/// restarting (see [`CHECKPOINT_EVERY`]), and before the writer
/// checkpointed itself the log grew by 17 MB a second at 12,500 requests a
/// second, until the disk would be full.
pub(crate) const WAL_LIMIT: u64 = 64 << 20;
/// How long the writer's connection waits for a lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long that full copy may wait for readers of older snapshots before
/// it gives up (the writer's queue fills meanwhile).
const WAL_RESTART_WAIT: Duration = Duration::from_millis(100);
/// How long the full copy at the close (and at the writer's end) may wait
/// for readers of older snapshots, another process's included: a shutdown
/// does not hang on them, and a log left as it was loses nothing.
const CLOSE_COPY_WAIT: Duration = Duration::from_secs(1);
/// After it gave up, how long until the next try: a long reader must not
/// cost the writer [`WAL_RESTART_WAIT`] in every [`CHECKPOINT_EVERY`].
const WAL_BUSY_BACKOFF: Duration = Duration::from_secs(2);

pub(crate) enum Op {
    Reserve {
        request_id: String,
        user_id: String,
        amount: i64,
        owner: String,
    },
    /// A user's ledger balance and the amount held for requests in flight.
    Balance {
        user_id: String,
    },
    Release {
        request_id: String,
    },
    Settle {
        settlement: Option<Box<Settlement>>,
        record: Option<Box<RequestRecord>>,
    },
    TakeDaily {
        key_id: String,
        day: String,
        limit: i64,
    },
    RefundDaily {
        key_id: String,
        day: String,
    },
    /// Releases the open reservations of one owner.
    Recover {
        owner: String,
    },
    /// Releases open reservations older than the given age.
    ReleaseStale {
        max_age_ms: i64,
    },
    /// Commits everything queued before it (the store's close) and, before
    /// it is answered, copies the write-ahead log into the database file in
    /// full and truncates it. After it the writer writes no reservation
    /// rows of its own: reservations still unwritten then are dropped, as a
    /// crash drops them, instead of being written a second later. Nor does
    /// it checkpoint the log any more unless it commits again: a store
    /// opened again on the same database in the same process writes to
    /// that same log, which the old writer thread (it ends only when the
    /// last handle is dropped) would otherwise copy and truncate under it.
    /// A store opened again on the same database releases the closed one's
    /// open reservations (`Op::Recover`); a row written by the old writer
    /// after that would stay open for good (seen in `ledger_props` with two
    /// busy loops on the cores, where the old writer thread ran late).
    /// Settlements and other operations queued later are still written.
    Close,
}

#[derive(Debug)]
pub(crate) enum Reply {
    /// Whether the reservation was made / the settlement newly written.
    Flag(bool),
    /// The day's used count after taking a unit; `None` when used up.
    Daily(Option<i64>),
    /// Rows changed.
    Count(u64),
    Balance {
        ledger: i64,
        reserved: i64,
    },
    Done,
}

impl Op {
    /// Whether the answer may wait for other work to share its commit.
    fn may_linger(&self) -> bool {
        matches!(self, Op::Settle { .. } | Op::Release { .. })
    }
}

struct Job {
    op: Op,
    /// `None` for a detached settlement: nobody waits for it, and the
    /// writer reports its outcome itself (see [`report_detached`]).
    reply: Option<oneshot::Sender<Result<Reply>>>,
}

impl Job {
    fn answer(self, result: Result<Reply>) {
        // A caller that went away no longer needs the answer.
        if let Some(reply) = self.reply {
            let _ = reply.send(result);
        }
    }
}

/// What reaches the thread through its channel.
enum Msg {
    Job(Job),
    /// Operations wait in [`FastPath::lingering`]: start the batch clock.
    Linger,
}

/// Work in the current batch.
enum Work {
    Job {
        job: Box<Job>,
        /// The reservation a settlement or release closes, when it was
        /// never written: no row to close.
        unwritten: Option<HoldRow>,
    },
    /// A granted reservation's row.
    Hold(HoldRow),
}

/// A reservation's row, granted and not yet written.
struct HoldRow {
    request_id: String,
    user_id: String,
    amount: i64,
    owner: String,
    created_ms: i64,
}

impl HoldRow {
    /// A reservation granted now.
    fn new(request_id: &str, user_id: &str, amount: i64, owner: &str) -> HoldRow {
        HoldRow {
            request_id: request_id.to_string(),
            user_id: user_id.to_string(),
            amount,
            owner: owner.to_string(),
            created_ms: now_ms(),
        }
    }
}

/// Reservations granted without a trip to the writer thread.
#[derive(Default)]
struct FastPath {
    /// Per user: what may still be reserved, and the epoch of the exact
    /// decision that published it.
    headroom: HashMap<String, (i64, u64)>,
    /// Granted here, not yet taken by the writer, with their epochs.
    holds: Vec<(HoldRow, u64)>,
    epoch: u64,
    /// Settlements and releases waiting for the next commit.
    lingering: Vec<Job>,
}

/// Publishes what a user may still reserve without the thread.
fn publish(fast: &mut FastPath, user_id: &str, room: i64) {
    fast.epoch += 1;
    let epoch = fast.epoch;
    if fast.headroom.len() >= MAX_HEADROOMS && !fast.headroom.contains_key(user_id) {
        fast.headroom.clear();
    }
    fast.headroom.insert(user_id.to_string(), (room, epoch));
}

/// Users whose headroom is kept, at most.
const MAX_HEADROOMS: usize = 100_000;
/// How often an idle writer takes the reservations granted without it and
/// writes the rows of those open for [`HOLD_UNWRITTEN`].
const SWEEP: Duration = Duration::from_millis(100);

fn lock(fast: &Mutex<FastPath>) -> std::sync::MutexGuard<'_, FastPath> {
    sluice_proto::sync::lock(fast)
}

/// Handle to the writer thread; the thread ends when the last handle drops.
pub(crate) struct Writer {
    tx: flume::Sender<Msg>,
    fast: Arc<Mutex<FastPath>>,
    /// Times one writer thread handed the connection to the other.
    handovers: Arc<AtomicU64>,
    /// The queue was full, or a commit held the writer too long, and the
    /// queue has not drained to [`BACKLOG_CLEARS_AT`] since.
    backlog: Backlog,
    /// Since when the current commit holds the writer.
    busy: Arc<Busy>,
    /// How long that may be before the writer counts as backlogged (see
    /// [`STUCK_AFTER`]).
    stuck_after: Duration,
    /// Ends (its sender dropped) once the writing thread has closed the
    /// connection, see [`Writer::closed`].
    closed: tokio::sync::watch::Receiver<()>,
}

/// Whether the writer is behind, with a margin (see
/// [`BACKLOG_CLEARS_AT`]): set when its queue is full or it is stuck in
/// one commit, cleared when the queue has drained that far.
#[derive(Default)]
struct Backlog(AtomicBool);

impl Backlog {
    /// Whether the writer is behind, given `queued` operations waiting in
    /// its queue of [`QUEUE`] and whether one commit has held it for too
    /// long with work waiting (see [`STUCK_AFTER`]).
    fn observe(&self, queued: usize, stuck: bool) -> bool {
        if queued >= QUEUE || stuck {
            if !self.0.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    queued,
                    stuck,
                    "the ledger writer is behind: turning new requests away until it catches up"
                );
            }
            return true;
        }
        if !self.0.load(Ordering::Relaxed) {
            return false;
        }
        if queued > BACKLOG_CLEARS_AT {
            return true;
        }
        if self.0.swap(false, Ordering::Relaxed) {
            tracing::info!(
                queued,
                "the ledger writer has caught up: taking requests again"
            );
        }
        false
    }
}

/// When the commit under way (with the checkpoint after it) began, for
/// [`Writer::backlogged`]: the writer threads mark their commits, callers
/// read how long the current one has taken.
struct Busy {
    base: Instant,
    /// Milliseconds from `base` to the start of the commit under way, plus
    /// one; 0 between commits.
    since: AtomicU64,
}

impl Busy {
    fn new() -> Busy {
        Busy {
            base: Instant::now(),
            since: AtomicU64::new(0),
        }
    }

    /// Marks a commit under way until the guard drops.
    fn enter(&self) -> BusyGuard<'_> {
        let ms = self.base.elapsed().as_millis() as u64;
        self.since.store(ms + 1, Ordering::Relaxed);
        BusyGuard(self)
    }

    /// How long the commit under way has taken so far (zero between
    /// commits).
    fn so_far(&self) -> Duration {
        match self.since.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => self
                .base
                .elapsed()
                .saturating_sub(Duration::from_millis(since - 1)),
        }
    }
}

struct BusyGuard<'a>(&'a Busy);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.since.store(0, Ordering::Relaxed);
    }
}

impl Writer {
    /// Opens the write connection and starts the writer threads, with the
    /// write-ahead log bounded at `wal_limit` bytes and the threads handing
    /// over at `relay`. `None` for databases that are not a file.
    pub fn start_with(url: &str, wal_limit: u64, relay: Relay) -> Result<Option<Writer>> {
        let Some(path) = sqlite_path(url) else {
            return Ok(None);
        };
        let conn = open(&path)?;
        // The writer checkpoints between its batches (see
        // `CHECKPOINT_EVERY`), not at the end of one.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let (tx, rx) = flume::bounded(QUEUE);
        let fast = Arc::new(Mutex::new(FastPath::default()));
        let (to_quiet, quiet_inbox) = std_mpsc::channel::<Baton>();
        let (to_catch_up, catch_up_inbox) = std_mpsc::channel::<Baton>();
        let (closed_tx, closed) = tokio::sync::watch::channel(());
        let baton = Baton {
            conn,
            pending: Pending::new(wal_path(&path), wal_limit),
            closed: closed_tx,
        };
        // Cannot fail: the receiver is right here.
        let _ = to_quiet.send(baton);
        let handovers = Arc::new(AtomicU64::new(0));
        let busy = Arc::new(Busy::new());
        let quiet = Turn {
            relay,
            rx: rx.clone(),
            fast: fast.clone(),
            handovers: handovers.clone(),
            busy: busy.clone(),
        };
        let catch_up = Turn {
            relay,
            rx,
            fast: fast.clone(),
            handovers: handovers.clone(),
            busy: busy.clone(),
        };
        std::thread::Builder::new()
            .name("sluice-ledger".into())
            .spawn(move || {
                lower_priority();
                write_in_turn(Role::Quiet, &quiet, &quiet_inbox, &to_catch_up);
            })
            .map_err(|e| StoreError::Invalid(format!("cannot start the ledger writer: {e}")))?;
        std::thread::Builder::new()
            .name("sluice-catchup".into())
            .spawn(move || {
                write_in_turn(Role::CatchUp, &catch_up, &catch_up_inbox, &to_quiet);
            })
            .map_err(|e| StoreError::Invalid(format!("cannot start the ledger writer: {e}")))?;
        Ok(Some(Writer {
            tx,
            fast,
            handovers,
            backlog: Backlog::default(),
            busy,
            stuck_after: relay.stuck_after,
            closed,
        }))
    }

    /// Resolves once the writing thread has closed the ledger's connection,
    /// which it does when every handle is dropped and everything is
    /// committed. Holds no handle itself. A process that exits before then
    /// kills the thread with the connection open, and SQLite then leaves
    /// the (emptied) `-wal` file behind.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut closed = self.closed.clone();
        async move {
            // Nothing is ever sent: this returns when the sender is dropped.
            while closed.changed().await.is_ok() {}
        }
    }

    /// Whether the writer has fallen so far behind that callers wait to
    /// queue work: its queue is full (settlements and releases fill the
    /// lingering list, as long as the queue, before they join it), or one
    /// commit has held it for [`STUCK_AFTER`] while work waits. The API
    /// turns new requests away while this holds, so that finished requests
    /// waiting to settle stay bounded in number and in time (a writer that
    /// gets too little CPU, waits for a lock another process holds or for
    /// a slow disk would otherwise let them pile up). It stays so until
    /// half the queue has drained (see [`BACKLOG_CLEARS_AT`]). The
    /// catch-up thread (see [`BACKGROUND_NICE`]) takes over long before,
    /// at [`HAND_OVER_AT`].
    pub fn backlogged(&self) -> bool {
        let queued = self.tx.len();
        let stuck = self.busy.so_far() >= self.stuck_after
            && (queued > 0 || !lock(&self.fast).lingering.is_empty());
        self.backlog.observe(queued, stuck)
    }

    /// Times the writer threads handed the connection to each other (see
    /// [`BACKGROUND_NICE`]).
    pub fn handovers(&self) -> u64 {
        self.handovers.load(Ordering::Relaxed)
    }

    /// Holds `amount` for a request: on this thread when the user's
    /// headroom covers it, else by an exact decision on the writer thread.
    pub async fn reserve(
        &self,
        request_id: &str,
        user_id: &str,
        amount: i64,
        owner: &str,
    ) -> Result<bool> {
        {
            let mut fast = lock(&self.fast);
            if let Some((room, epoch)) = fast.headroom.get_mut(user_id) {
                if *room >= amount {
                    *room -= amount;
                    let epoch = *epoch;
                    fast.holds
                        .push((HoldRow::new(request_id, user_id, amount, owner), epoch));
                    return Ok(true);
                }
            }
        }
        let op = Op::Reserve {
            request_id: request_id.to_string(),
            user_id: user_id.to_string(),
            amount,
            owner: owner.to_string(),
        };
        Ok(matches!(self.call(op).await?, Reply::Flag(true)))
    }

    pub async fn call(&self, op: Op) -> Result<Reply> {
        let (reply, rx) = oneshot::channel();
        self.enqueue(Job {
            op,
            reply: Some(reply),
        })
        .await?;
        rx.await.map_err(|_| stopped())?
    }

    /// Queues a settlement nobody waits for: the caller goes on at once
    /// (it still waits while the queue is full), and the thread wakes no
    /// task when the batch commits. The writer logs the outcome and, when
    /// the settlement fails, writes the request's row alone. [`Op::Close`]
    /// (the store's close) commits every detached settlement queued
    /// before it.
    pub async fn detach(
        &self,
        settlement: Option<Settlement>,
        record: RequestRecord,
    ) -> Result<()> {
        self.enqueue(Job {
            op: Op::Settle {
                settlement: settlement.map(Box::new),
                record: Some(Box::new(record)),
            },
            reply: None,
        })
        .await
    }

    async fn enqueue(&self, job: Job) -> Result<()> {
        let job = if job.op.may_linger() {
            self.linger(job)
        } else {
            Some(job)
        };
        if let Some(job) = job {
            let msg = match self.tx.try_send(Msg::Job(job)) {
                Ok(()) => return Ok(()),
                Err(flume::TrySendError::Disconnected(_)) => return Err(stopped()),
                Err(flume::TrySendError::Full(msg)) => msg,
            };
            // Full: behind, even if nobody asks before it drains a little.
            self.backlog.observe(QUEUE, false);
            self.tx.send_async(msg).await.map_err(|_| stopped())?;
        }
        Ok(())
    }

    /// Leaves an operation for the next commit without waking the thread
    /// (but for the first of a batch); gives it back when the list is full.
    fn linger(&self, job: Job) -> Option<Job> {
        let first = {
            let mut fast = lock(&self.fast);
            if fast.lingering.len() >= QUEUE {
                return Some(job);
            }
            fast.lingering.push(job);
            fast.lingering.len() == 1
        };
        if first {
            match self.tx.try_send(Msg::Linger) {
                // Full: the thread is busy and takes the list with its
                // next message anyway.
                Ok(()) | Err(flume::TrySendError::Full(_)) => {}
                // Nobody will answer: drop the waiting replies.
                Err(flume::TrySendError::Disconnected(_)) => {
                    lock(&self.fast).lingering.clear();
                }
            }
        }
        None
    }
}

fn stopped() -> StoreError {
    StoreError::Invalid("the ledger writer has stopped".into())
}

/// The file behind a `sqlite:` URL, or `None` for an in-memory database.
fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let path = rest.split('?').next().unwrap_or(rest);
    if path.is_empty() || path.contains(":memory:") || url.contains("mode=memory") {
        return None;
    }
    Some(PathBuf::from(path))
}

fn open(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Savepoint journals in memory, not in a temporary file per batch;
    // pages read through a map, not a system call each.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "mmap_size", 256i64 << 20)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Which of the two writer threads runs the loop (see
/// [`BACKGROUND_NICE`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    /// At [`BACKGROUND_NICE`], yielding between items: writes while it
    /// keeps up.
    Quiet,
    /// At the default priority, never yielding: writes while the quiet
    /// thread would be behind.
    CatchUp,
    /// The other thread is gone: writes to the end without handing over.
    Alone,
}

/// When the writer threads hand the connection to each other, and when
/// the writer counts as backlogged.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Relay {
    /// Operations waiting (see [`HAND_OVER_AT`]) from which the quiet
    /// thread is behind.
    pub behind_at: usize,
    /// Operations waiting below which the catch-up thread has kept up.
    pub kept_up_below: usize,
    /// How long the catch-up thread keeps writing after it was last behind.
    pub hold: Duration,
    /// The cores' idle time over that hold, in percent, from which the
    /// catch-up thread hands back.
    pub min_idle_pct: f64,
    /// The catch-up thread's wait for a CPU per time running over that
    /// hold, below which it hands back.
    pub max_wait_per_run: f64,
    /// How long one commit may hold the writer before it counts as
    /// backlogged (see [`STUCK_AFTER`]).
    pub stuck_after: Duration,
}

impl Relay {
    pub const DEFAULT: Relay = Relay {
        behind_at: HAND_OVER_AT,
        kept_up_below: HAND_OVER_AT,
        hold: CATCH_UP_HOLD,
        min_idle_pct: MIN_IDLE_PCT,
        max_wait_per_run: MAX_WAIT_PER_RUN,
        stuck_after: STUCK_AFTER,
    };
}

/// What each writer thread works with, whichever holds the baton.
struct Turn {
    relay: Relay,
    rx: flume::Receiver<Msg>,
    fast: Arc<Mutex<FastPath>>,
    handovers: Arc<AtomicU64>,
    busy: Arc<Busy>,
}

/// What the writing thread holds, and hands to the other between batches.
struct Baton {
    conn: Connection,
    pending: Pending,
    /// Dropped after the connection (fields drop in order, and the thread
    /// that ends the writing drops the two in turn): tells the waiters of
    /// [`Writer::closed`] the connection is closed.
    closed: tokio::sync::watch::Sender<()>,
}

/// The writer's state but its prepared statements (which borrow the
/// connection and stay on their thread): what one thread hands the other.
struct Pending {
    batch: Vec<Work>,
    /// Granted reservations without a row yet, by request id.
    unwritten: HashMap<String, HoldRow>,
    /// Per user: reservations granted and not written (the unwritten ones
    /// and those in the batch).
    held: HashMap<String, i64>,
    /// When the batch must commit at the latest.
    deadline: Option<Instant>,
    /// Commit as soon as the queue is drained.
    now: bool,
    /// An [`Op::Close`] was answered: write no reservation rows any more.
    closed: bool,
    /// A batch was committed after the close: the log holds this writer's
    /// frames again, to checkpoint as before.
    written_after_close: bool,
    /// The write-ahead log's file and its limit, when to checkpoint next,
    /// and until when not to try truncating it after a try gave up.
    wal: PathBuf,
    wal_limit: u64,
    checkpoint_next: Instant,
    truncate_after: Instant,
}

impl Pending {
    fn new(wal: PathBuf, wal_limit: u64) -> Pending {
        Pending {
            batch: Vec::with_capacity(BATCH),
            unwritten: HashMap::new(),
            held: HashMap::new(),
            deadline: None,
            now: false,
            closed: false,
            written_after_close: false,
            wal,
            wal_limit,
            checkpoint_next: Instant::now() + CHECKPOINT_EVERY,
            truncate_after: Instant::now(),
        }
    }
}

struct State<'c> {
    db: Prepared<'c>,
    fast: Arc<Mutex<FastPath>>,
    busy: Arc<Busy>,
    role: Role,
    p: Pending,
}

/// Operations waiting for the writer: queued, and lingering for the next
/// batch.
fn waiting(rx: &flume::Receiver<Msg>, fast: &Mutex<FastPath>) -> usize {
    rx.len() + lock(fast).lingering.len()
}

/// Runs the writer's loop whenever this thread holds the baton, and hands
/// the baton to the other thread when [`run`] says so. Returns once the
/// writing has ended (every handle dropped, everything committed) on
/// either thread.
fn write_in_turn(
    mut role: Role,
    turn: &Turn,
    inbox: &std_mpsc::Receiver<Baton>,
    other: &std_mpsc::Sender<Baton>,
) {
    let mut kept = None;
    loop {
        let baton = match kept.take() {
            Some(b) => b,
            // Closed: the other thread ended the writing.
            None => match inbox.recv() {
                Ok(b) => b,
                Err(_) => return,
            },
        };
        let Baton {
            conn,
            pending,
            closed,
        } = baton;
        let Some(pending) = run(&conn, turn, role, pending) else {
            // The connection first, then the word that it is closed.
            drop(conn);
            drop(closed);
            return;
        };
        let baton = Baton {
            conn,
            pending,
            closed,
        };
        match other.send(baton) {
            Ok(()) => {
                turn.handovers.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(?role, "ledger writer handed over");
            }
            Err(std_mpsc::SendError(baton)) => {
                tracing::warn!(
                    ?role,
                    "the other ledger writer thread is gone; writing alone"
                );
                role = Role::Alone;
                kept = Some(baton);
            }
        }
    }
}

/// Runs the writer's loop on this thread. `Some` with the state to hand
/// to the other thread when `role` and `relay` say it should write now;
/// `None` once every handle is gone and everything is committed.
fn run(conn: &Connection, turn: &Turn, role: Role, pending: Pending) -> Option<Pending> {
    let (rx, relay) = (&turn.rx, turn.relay);
    let mut st = State::resume(conn, turn, role, pending);
    // The catch-up thread's window: since when it has kept up, and the
    // cores' and its own counters then (`None` while it is behind).
    let mut window: Option<(Instant, Counters)> = None;
    loop {
        let next = if st.p.batch.is_empty() && st.p.deadline.is_none() && !st.p.now {
            match rx.recv_timeout(SWEEP) {
                Ok(msg) => Some(msg),
                Err(flume::RecvTimeoutError::Timeout) => {
                    st.take_from_callers();
                    st.commit(&|| false);
                    continue;
                }
                Err(flume::RecvTimeoutError::Disconnected) => {
                    st.take_from_callers();
                    st.commit(&|| false);
                    // A failed detached settlement left its request's row.
                    st.commit(&|| false);
                    // A last full copy, so the log does not outlive the
                    // writer (done at the close already, unless it wrote
                    // since).
                    if st.ours_to_checkpoint() {
                        st.copy_whole_log("the writer's last");
                    }
                    return None;
                }
            }
        } else if st.p.batch.len() >= BATCH {
            None
        } else if st.p.now {
            rx.try_recv().ok()
        } else {
            match st.p.deadline {
                Some(d) => rx.recv_deadline(d).ok(),
                None => rx.try_recv().ok(),
            }
        };
        match next {
            Some(Msg::Job(job)) => {
                st.take_from_callers();
                st.accept(job);
            }
            Some(Msg::Linger) => st.linger(),
            None => {
                st.take_from_callers();
                // Before the commit: a quiet thread that is behind leaves
                // this batch to the catch-up thread too.
                if st.role == Role::Quiet && st.backlog(rx) >= relay.behind_at {
                    return Some(st.suspend());
                }
                // And during it, between two yields: also when the batch
                // has taken so long that other work must be keeping this
                // thread off the cores (with few callers, each waiting for
                // its answer, the queue never grows long).
                let fast = st.fast.clone();
                let started = Instant::now();
                if !st.commit(&|| {
                    started.elapsed() >= QUIET_BATCH_LIMIT || waiting(rx, &fast) >= relay.behind_at
                }) {
                    return Some(st.suspend());
                }
                // After it: every turn of the catch-up thread commits.
                if st.role == Role::CatchUp {
                    if st.backlog(rx) >= relay.kept_up_below {
                        window = None;
                    } else {
                        let now = Instant::now();
                        let (since, then) = *window.get_or_insert_with(|| (now, Counters::now()));
                        if now.duration_since(since) >= relay.hold {
                            let counters = Counters::now();
                            if then.room_until(&counters, &relay) {
                                return Some(st.suspend());
                            }
                            // Other work keeps the cores, or this one,
                            // busy: the quiet thread would fall behind
                            // again.
                            window = Some((now, counters));
                        }
                    }
                }
            }
        }
    }
}

/// What the catch-up thread reads at both ends of its window.
#[derive(Clone, Copy)]
struct Counters {
    machine: Option<MachineTicks>,
    thread: Option<ThreadTicks>,
}

impl Counters {
    fn now() -> Counters {
        Counters {
            machine: MachineTicks::now(),
            thread: ThreadTicks::now(),
        }
    }

    /// Whether the quiet thread would find CPU time from `self` to
    /// `later`: the cores were idle enough and this thread did not wait
    /// long for its CPU (each where the kernel tells).
    fn room_until(&self, later: &Counters, relay: &Relay) -> bool {
        let idle = self
            .machine
            .zip(later.machine)
            .and_then(|(a, b)| a.idle_pct_until(&b));
        let wait = self
            .thread
            .zip(later.thread)
            .and_then(|(a, b)| a.wait_per_run_until(&b));
        idle.is_none_or(|pct| pct >= relay.min_idle_pct)
            && wait.is_none_or(|w| w < relay.max_wait_per_run)
    }
}

impl<'c> State<'c> {
    fn resume(conn: &'c Connection, turn: &Turn, role: Role, p: Pending) -> Self {
        State {
            db: Prepared::new(conn),
            fast: turn.fast.clone(),
            busy: turn.busy.clone(),
            role,
            p,
        }
    }

    /// The state to hand over; the prepared statements end here.
    fn suspend(self) -> Pending {
        self.p
    }

    /// Operations waiting, in the batch and for it.
    fn backlog(&self, rx: &flume::Receiver<Msg>) -> usize {
        self.p.batch.len() + waiting(rx, &self.fast)
    }

    /// Takes what callers left without a message: reservations granted on
    /// their threads (first: a settlement closes its reservation) and
    /// lingering settlements and releases.
    fn take_from_callers(&mut self) {
        let shared = self.fast.clone();
        let lingering = {
            let mut fast = lock(&shared);
            self.absorb_holds(&mut fast);
            std::mem::take(&mut fast.lingering)
        };
        for job in lingering {
            self.accept(job);
        }
    }

    /// Takes the reservations granted on callers' threads.
    fn absorb_holds(&mut self, fast: &mut FastPath) {
        for (h, epoch) in std::mem::take(&mut fast.holds) {
            // Granted from an older headroom than the user's current one,
            // which was computed without it: take it off that one.
            if let Some((room, current)) = fast.headroom.get_mut(&h.user_id) {
                if *current > epoch {
                    *room -= h.amount;
                }
            }
            self.hold(h);
        }
    }

    /// Counts a granted reservation as held until it is written or closed.
    fn hold(&mut self, h: HoldRow) {
        *self.p.held.entry(h.user_id.clone()).or_insert(0) += h.amount;
        self.p.unwritten.insert(h.request_id.clone(), h);
    }

    /// No longer counts `amount` as held for `user_id`.
    fn unhold(&mut self, user_id: &str, amount: i64) {
        if let Some(h) = self.p.held.get_mut(user_id) {
            *h -= amount;
            if *h <= 0 {
                self.p.held.remove(user_id);
            }
        }
    }

    /// Starts the batch clock for lingering operations.
    fn linger(&mut self) {
        let until = Instant::now() + LINGER;
        self.p.deadline = Some(self.p.deadline.map_or(until, |d| d.min(until)));
    }

    fn accept(&mut self, job: Job) {
        match &job.op {
            Op::Reserve {
                request_id,
                user_id,
                amount,
                owner,
            } => {
                let result = self.reserve(request_id, user_id, *amount, owner);
                job.answer(result.map(Reply::Flag));
            }
            Op::Balance { user_id } => {
                let result = self
                    .balance(user_id)
                    .map(|(ledger, reserved)| Reply::Balance {
                        ledger,
                        reserved: reserved + self.p.held.get(user_id).copied().unwrap_or(0),
                    });
                job.answer(result);
            }
            op => {
                let closes = match op {
                    Op::Settle {
                        settlement: Some(s),
                        ..
                    } => Some(s.request_id.as_str()),
                    Op::Release { request_id } => Some(request_id.as_str()),
                    _ => None,
                };
                let unwritten = closes.and_then(|id| self.p.unwritten.remove(id));
                if op.may_linger() {
                    self.linger();
                } else {
                    self.p.now = true;
                }
                self.p.batch.push(Work::Job {
                    job: Box::new(job),
                    unwritten,
                });
            }
        }
    }

    /// Committed (ledger balance, open reservations) of a user.
    fn balance(&mut self, user_id: &str) -> Result<(i64, i64)> {
        // One statement: one read transaction (and one set of locks).
        let q = sql::balance_and_reserved(user_id);
        Ok(self
            .db
            .query_row(&q, |r| Ok((r.get(0)?, r.get(1)?)))?
            .unwrap_or((0, 0)))
    }

    fn reserve(
        &mut self,
        request_id: &str,
        user_id: &str,
        amount: i64,
        owner: &str,
    ) -> Result<bool> {
        let (ledger, reserved) = self.balance(user_id)?;
        // Callers may have granted from the old headroom while the query
        // ran: count those and decide before any more can be granted.
        let shared = self.fast.clone();
        let mut fast = lock(&shared);
        self.absorb_holds(&mut fast);
        let held = self.p.held.get(user_id).copied().unwrap_or(0);
        let available = ledger - reserved - held;
        if available < amount {
            publish(&mut fast, user_id, available);
            return Ok(false);
        }
        publish(&mut fast, user_id, available - amount);
        self.hold(HoldRow::new(request_id, user_id, amount, owner));
        Ok(true)
    }

    /// Writes the rows of reservations open for [`HOLD_UNWRITTEN`] (after
    /// the batch's work, which may close some of them) and commits.
    ///
    /// The quiet thread yields between items and asks `give_up` after each
    /// yield: when it says so, the batch is rolled back and kept (to commit
    /// as soon as possible, on the other thread) and the answer is false.
    /// Marked in [`Busy`] while under way, the checkpoint after it too.
    fn commit(&mut self, give_up: &dyn Fn() -> bool) -> bool {
        let busy = self.busy.clone();
        let _busy = busy.enter();
        // After a close, reservations stay unwritten (see `Op::Close`).
        if !self.p.closed {
            let cutoff = now_ms() - HOLD_UNWRITTEN.as_millis() as i64;
            let aged = self.p.unwritten.extract_if(|_, h| h.created_ms <= cutoff);
            self.p.batch.extend(aged.map(|(_, h)| Work::Hold(h)));
        }
        self.p.deadline = None;
        self.p.now = false;
        if self.p.batch.is_empty() {
            // Idle: what the last batches wrote is copied all the same.
            self.maintain();
            return true;
        }
        let quiet = (self.role == Role::Quiet).then_some(give_up);
        let closed_before = self.p.closed;
        let Some(results) = commit_batch(&mut self.db, &self.p.batch, quiet) else {
            self.p.now = true;
            return false;
        };
        if closed_before {
            self.p.written_after_close = true;
        }
        let batch = std::mem::replace(&mut self.p.batch, Vec::with_capacity(BATCH));
        // Whether a failed detached settlement left its row to the next
        // batch.
        let mut retried = false;
        for (work, result) in batch.into_iter().zip(results) {
            match work {
                Work::Job { job, unwritten } => {
                    if let Some(h) = unwritten {
                        if result.is_ok() {
                            self.unhold(&h.user_id, h.amount);
                        } else {
                            // Still open: it may be settled or released again.
                            self.p.unwritten.insert(h.request_id.clone(), h);
                        }
                    }
                    if job.reply.is_some() {
                        if retried && matches!(job.op, Op::Close) {
                            // A close promises everything queued before it
                            // committed, those rows too: it is answered
                            // after them.
                            self.p.batch.push(Work::Job {
                                job,
                                unwritten: None,
                            });
                        } else {
                            if matches!(job.op, Op::Close) && result.is_ok() {
                                self.p.closed = true;
                                self.copy_whole_log("the close's");
                            }
                            job.answer(result);
                        }
                    } else if let Some(retry) = report_detached(job.op, result) {
                        self.p.batch.push(Work::Job {
                            job: Box::new(retry),
                            unwritten: None,
                        });
                        self.p.now = true;
                        retried = true;
                    }
                }
                Work::Hold(h) => {
                    // Committed: the table holds it now. Failed: nothing
                    // holds it (the request goes on; its settlement charges).
                    self.unhold(&h.user_id, h.amount);
                    if let Err(e) = result {
                        tracing::error!(request_id = h.request_id, error = %e, "could not write a reservation");
                    }
                }
            }
        }
        self.maintain();
        true
    }

    /// Whether the log may hold frames of this writer's not yet copied:
    /// always before the close, and after it once it committed again (see
    /// [`Op::Close`]).
    fn ours_to_checkpoint(&self) -> bool {
        !self.p.closed || self.p.written_after_close
    }

    /// Copies the whole log into the database file and truncates it
    /// ([`truncate_wal`]; `what` names the copy in the warning if it fails,
    /// for instance because a reader held an old snapshot for all of
    /// [`CLOSE_COPY_WAIT`]: the log then stays as it was, which loses
    /// nothing).
    fn copy_whole_log(&mut self, what: &str) {
        match truncate_wal(self.db.conn, CLOSE_COPY_WAIT) {
            Ok(true) => {}
            Ok(false) => tracing::warn!("{what} WAL checkpoint found the log in use by a reader"),
            Err(e) => tracing::warn!(error = %e, "{what} WAL checkpoint failed"),
        }
        self.p.written_after_close = false;
    }

    /// Every [`CHECKPOINT_EVERY`], between batches: copies the write-ahead
    /// log into the database file, and truncates it if it is still over
    /// its limit (see [`WAL_LIMIT`]).
    fn maintain(&mut self) {
        let started = Instant::now();
        if started < self.p.checkpoint_next || !self.ours_to_checkpoint() {
            return;
        }
        self.p.checkpoint_next = started + CHECKPOINT_EVERY;
        if let Err(e) = self
            .db
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
        if started < self.p.truncate_after {
            return;
        }
        match bound_wal(
            self.db.conn,
            &self.p.wal,
            self.p.wal_limit,
            WAL_RESTART_WAIT,
        ) {
            Ok(WalBound::Under) => {}
            Ok(WalBound::Truncated { from }) => tracing::debug!(
                bytes = from,
                ms = started.elapsed().as_millis() as u64,
                "write-ahead log copied in full and truncated"
            ),
            Ok(WalBound::Busy { size }) => {
                self.p.truncate_after = Instant::now() + WAL_BUSY_BACKOFF;
                tracing::debug!(
                    bytes = size,
                    "write-ahead log over its limit, but a reader was in the way"
                );
            }
            Err(e) => {
                self.p.truncate_after = Instant::now() + WAL_BUSY_BACKOFF;
                tracing::warn!(error = %e, "could not truncate the write-ahead log");
            }
        }
    }
}

/// The write-ahead log of the database at `db`.
fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// What [`bound_wal`] did.
#[derive(Debug, PartialEq)]
enum WalBound {
    /// The log is under the limit (or not there): nothing to do.
    Under,
    /// The log was copied in full and truncated; it held `from` bytes.
    Truncated { from: u64 },
    /// Over the limit, but a reader of an older snapshot or another
    /// connection's checkpoint did not give way within the wait.
    Busy { size: u64 },
}

/// When the log at `wal` holds more than `limit` bytes, copies all of it
/// into the database and truncates it (`wal_checkpoint(TRUNCATE)`) on
/// `conn`, waiting at most `wait` for readers. Run on the writer's own
/// connection between batches, so no write is in the way.
fn bound_wal(conn: &Connection, wal: &Path, limit: u64, wait: Duration) -> Result<WalBound> {
    let size = match std::fs::metadata(wal) {
        Ok(m) => m.len(),
        Err(_) => return Ok(WalBound::Under),
    };
    if size <= limit {
        return Ok(WalBound::Under);
    }
    Ok(if truncate_wal(conn, wait)? {
        WalBound::Truncated { from: size }
    } else {
        WalBound::Busy { size }
    })
}

/// Copies all of the log into the database and truncates it
/// (`wal_checkpoint(TRUNCATE)`) on `conn`, waiting at most `wait` for
/// readers of older snapshots: false when one (or another connection's
/// checkpoint) stayed in the way, and the log was left as it was.
fn truncate_wal(conn: &Connection, wait: Duration) -> Result<bool> {
    conn.busy_timeout(wait)?;
    let busy = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        r.get::<_, i64>(0)
    });
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(busy? == 0)
}

/// Logs what became of a detached settlement (see [`Writer::detach`]).
/// When it failed with its settlement, returns the job that writes the
/// request's row alone: the reservation stays open and recovery releases
/// it, so the request is not charged, and never charged twice.
fn report_detached(op: Op, result: Result<Reply>) -> Option<Job> {
    let Op::Settle { settlement, record } = op else {
        return None;
    };
    let id = record.as_ref().map_or("", |r| r.id.as_str());
    let settled = result.map(|reply| matches!(reply, Reply::Flag(true)));
    if !crate::ledger::report_finish(id, settlement.is_some(), &settled) {
        return None;
    }
    record.map(|record| Job {
        op: Op::Settle {
            settlement: None,
            record: Some(record),
        },
        reply: None,
    })
}

/// Runs a batch in one transaction; every item gets its own result, or
/// the commit's error when the commit fails. `None` when `quiet` gave up
/// (see [`run_batch`]): nothing committed.
fn commit_batch(
    db: &mut Prepared<'_>,
    batch: &[Work],
    quiet: Option<&dyn Fn() -> bool>,
) -> Option<Vec<Result<Reply>>> {
    // Items rarely fail: run the batch plainly first, and only when one
    // fails roll it all back and run it again with a savepoint per item
    // (two more statements per item, on every batch otherwise).
    match run_batch(db, batch, false, quiet) {
        Ran::Done(results) => Some(results),
        Ran::GaveUp => None,
        Ran::ItemFailed => match run_batch(db, batch, true, quiet) {
            Ran::Done(results) => Some(results),
            Ran::GaveUp => None,
            Ran::ItemFailed => Some(
                batch
                    .iter()
                    .map(|_| Err(StoreError::Invalid("ledger batch failed".into())))
                    .collect(),
            ),
        },
    }
}

/// How a batch's transaction ended.
enum Ran {
    /// Committed, or its commit failed: each item's result.
    Done(Vec<Result<Reply>>),
    /// An item failed without `isolate`: everything rolled back.
    ItemFailed,
    /// The quiet thread gave up: everything rolled back.
    GaveUp,
}

/// One transaction over the batch. Without `isolate`, the first failing
/// item rolls everything back. With `quiet`, the thread yields every
/// [`YIELD_EVERY`] items and rolls everything back when `quiet` says so
/// after a yield.
fn run_batch(
    db: &mut Prepared<'_>,
    batch: &[Work],
    isolate: bool,
    quiet: Option<&dyn Fn() -> bool>,
) -> Ran {
    if let Err(e) = db.run("BEGIN IMMEDIATE") {
        return Ran::Done(batch.iter().map(|_| Err(failed(&e))).collect());
    }
    let mut results = Vec::with_capacity(batch.len());
    // Plainly, the balance changes of the whole batch are summed and
    // written once per account at its end.
    let mut deltas: HashMap<String, i64> = HashMap::new();
    for (i, work) in batch.iter().enumerate() {
        if let Some(give_up) = quiet {
            if i % YIELD_EVERY == YIELD_EVERY - 1 {
                std::thread::yield_now();
                if give_up() {
                    db.rollback();
                    return Ran::GaveUp;
                }
            }
        }
        let result = if isolate {
            match db.run("SAVEPOINT item") {
                Ok(()) => {
                    let applied = apply(db, work, None).and_then(|reply| {
                        db.run("RELEASE item")
                            .map(|()| reply)
                            .map_err(StoreError::from)
                    });
                    if applied.is_err() {
                        // Undo this item only.
                        if let Err(e) = db
                            .run("ROLLBACK TO item")
                            .and_then(|()| db.run("RELEASE item"))
                        {
                            tracing::error!(error = %e, "could not roll a ledger item back");
                            db.rollback();
                            return Ran::ItemFailed;
                        }
                    }
                    applied
                }
                Err(e) => Err(e.into()),
            }
        } else {
            match apply(db, work, Some(&mut deltas)) {
                Ok(reply) => Ok(reply),
                Err(_) => {
                    db.rollback();
                    return Ran::ItemFailed;
                }
            }
        };
        results.push(result);
    }
    let deltas: Vec<(String, i64)> = deltas.into_iter().filter(|(_, a)| *a != 0).collect();
    for stmt in deltas
        .chunks(DELTAS_PER_STATEMENT)
        .filter_map(sql::balances_upsert)
    {
        if db.exec(&stmt).is_err() {
            db.rollback();
            return Ran::ItemFailed;
        }
    }
    Ran::Done(match db.run("COMMIT") {
        Ok(()) => results,
        Err(e) => {
            tracing::error!(error = %e, "ledger batch commit failed");
            db.rollback();
            batch.iter().map(|_| Err(failed(&e))).collect()
        }
    })
}

fn failed(e: &rusqlite::Error) -> StoreError {
    StoreError::Invalid(format!("database error: {e}"))
}

/// Statements the writer's connection runs, each prepared once and kept:
/// rusqlite's own cache hashes the SQL text on every lookup and again when
/// the statement goes back, for every statement of every request.
struct Prepared<'c> {
    conn: &'c Connection,
    /// By the address and length of their SQL, which is `'static`: the
    /// same text is the same statement.
    stmts: Vec<((usize, usize), Statement<'c>)>,
}

/// Statements kept, at most (the writer runs about twenty).
const MAX_PREPARED: usize = 64;

impl<'c> Prepared<'c> {
    fn new(conn: &'c Connection) -> Self {
        Prepared {
            conn,
            stmts: Vec::new(),
        }
    }

    fn get(&mut self, sql: &'static str) -> rusqlite::Result<&mut Statement<'c>> {
        let key = (sql.as_ptr() as usize, sql.len());
        let i = match self.stmts.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                if self.stmts.len() >= MAX_PREPARED {
                    self.stmts.clear();
                }
                self.stmts.push((key, self.conn.prepare(sql)?));
                self.stmts.len() - 1
            }
        };
        Ok(&mut self.stmts[i].1)
    }

    /// Runs a statement without parameters (transaction control).
    fn run(&mut self, sql: &'static str) -> rusqlite::Result<()> {
        self.get(sql)?.execute([]).map(|_| ())
    }

    /// Rolls the open transaction back, if any.
    fn rollback(&mut self) {
        if !self.conn.is_autocommit() {
            if let Err(e) = self.run("ROLLBACK") {
                tracing::error!(error = %e, "ledger rollback failed");
            }
        }
    }

    /// Runs `run` on the statement of `s`: a kept one for `'static` SQL,
    /// else rusqlite's cache (SQL built per call: balance upserts, one text
    /// per number of accounts).
    fn with<T>(
        &mut self,
        s: &Stmt<'_>,
        run: impl FnOnce(&mut Statement<'c>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        match &s.sql {
            Cow::Borrowed(sql) => run(self.get(sql)?),
            Cow::Owned(sql) => run(&mut *self.conn.prepare_cached(sql)?),
        }
    }

    /// Runs `s`; rows changed.
    fn exec(&mut self, s: &Stmt<'_>) -> Result<usize> {
        Ok(self.with(s, |st| st.execute(params_from_iter(s.vals.iter())))?)
    }

    /// The first row of `s`, if any.
    fn query_row<T>(
        &mut self,
        s: &Stmt<'_>,
        f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Option<T>> {
        Ok(self.with(s, |st| {
            st.query_row(params_from_iter(s.vals.iter()), f).optional()
        })?)
    }
}

/// Runs one item. With `deltas`, balance changes are added there for the
/// caller to write; without, they are written here.
fn apply(
    db: &mut Prepared<'_>,
    work: &Work,
    deltas: Option<&mut HashMap<String, i64>>,
) -> Result<Reply> {
    let (op, has_row) = match work {
        Work::Hold(HoldRow {
            request_id,
            user_id,
            amount,
            owner,
            created_ms,
        }) => {
            let s = sql::hold(request_id, user_id, *amount, owner, *created_ms);
            db.exec(&s)?;
            return Ok(Reply::Done);
        }
        Work::Job { job, unwritten } => (&job.op, unwritten.is_none()),
    };
    match op {
        Op::Reserve { .. } | Op::Balance { .. } => Err(StoreError::Invalid(
            "reservations and balances are answered before the batch".into(),
        )),
        Op::Release { request_id } => {
            if has_row {
                db.exec(&sql::release(request_id))?;
            }
            Ok(Reply::Done)
        }
        Op::Settle { settlement, record } => {
            let now = now_ms();
            let mut settled = false;
            // The settlement's arithmetic was checked before it was queued.
            if let Some(s) = settlement {
                if db.exec(&sql::settlement_row(s, now))? == 1 {
                    settled = true;
                    if let Some((entries, moved)) =
                        sql::settlement_parts(s, now, sql::OnError::Fail)
                    {
                        db.exec(&entries)?;
                        match deltas {
                            Some(deltas) => {
                                for (account, amount) in moved {
                                    match deltas.get_mut(&*account) {
                                        Some(d) => *d += amount,
                                        None => {
                                            deltas.insert(account.into_owned(), amount);
                                        }
                                    }
                                }
                            }
                            None => {
                                if let Some(stmt) = sql::balances_upsert(&moved) {
                                    db.exec(&stmt)?;
                                }
                            }
                        }
                    }
                    if has_row {
                        db.exec(&sql::close_reservation(&s.request_id))?;
                    }
                }
            }
            if let Some(r) = record {
                db.exec(&sql::request_row(r))?;
            }
            Ok(Reply::Flag(settled))
        }
        Op::TakeDaily { key_id, day, limit } => {
            db.exec(&sql::daily_row(key_id, day))?;
            if db.exec(&sql::daily_take(key_id, day, *limit))? == 0 {
                return Ok(Reply::Daily(None));
            }
            let used: Option<i64> = db.query_row(&sql::daily_used(key_id, day), |r| r.get(0))?;
            Ok(Reply::Daily(Some(used.unwrap_or(0))))
        }
        Op::RefundDaily { key_id, day } => {
            db.exec(&sql::daily_refund(key_id, day))?;
            Ok(Reply::Done)
        }
        Op::Close => Ok(Reply::Done),
        Op::Recover { owner } => Ok(Reply::Count(db.exec(&sql::recover(owner))? as u64)),
        Op::ReleaseStale { max_age_ms } => Ok(Reply::Count(
            db.exec(&sql::release_stale(now_ms() - max_age_ms))? as u64,
        )),
    }
}

/// Sets the calling thread's nice value to [`BACKGROUND_NICE`] (on Linux
/// the nice value belongs to each thread); a refusal only costs latency.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let me = rustix::thread::gettid();
        if let Err(e) = rustix::process::setpriority_process(Some(me), BACKGROUND_NICE) {
            tracing::debug!(error = %e, "could not lower the ledger thread's priority");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{bound_wal, sqlite_path, wal_path, Op, Prepared, Reply, WalBound, Writer};
    use crate::ledger::Settlement;
    use crate::sql::{self, OnError};
    use crate::Result;
    use rusqlite::Connection;
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// A log over the limit is copied into the database and truncated,
    /// unless a reader still reads from it: then the writer is told so
    /// within the wait and may try again later; nothing is lost either way.
    #[test]
    fn an_overgrown_log_is_truncated_once_no_reader_needs_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ledger.db");
        let conn = Connection::open(&db).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        conn.execute_batch("CREATE TABLE t (x BLOB)").unwrap();
        for _ in 0..64 {
            conn.execute("INSERT INTO t VALUES (zeroblob(8192))", [])
                .unwrap();
        }
        let wal = wal_path(&db);
        assert_eq!(wal, dir.path().join("ledger.db-wal"));
        let size = std::fs::metadata(&wal).unwrap().len();
        assert!(size > 512 * 1024, "the log holds {size} bytes");
        let wait = Duration::from_millis(50);
        assert_eq!(bound_wal(&conn, &wal, size, wait).unwrap(), WalBound::Under);

        let reader = Connection::open(&db).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let seen: i64 = reader
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(seen, 64);
        let t = Instant::now();
        assert_eq!(
            bound_wal(&conn, &wal, 64 * 1024, wait).unwrap(),
            WalBound::Busy { size }
        );
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "it waited {:?}",
            t.elapsed()
        );
        // The connection waits for locks as long as before.
        let ms: i64 = conn
            .query_row("PRAGMA busy_timeout", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ms, super::BUSY_TIMEOUT.as_millis() as i64);
        reader.execute_batch("COMMIT").unwrap();

        assert_eq!(
            bound_wal(&conn, &wal, 64 * 1024, wait).unwrap(),
            WalBound::Truncated { from: size }
        );
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0);
        let after = Connection::open(&db).unwrap();
        let rows: i64 = after
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 64);
        // Writing goes on into the truncated log.
        conn.execute("INSERT INTO t VALUES (zeroblob(8))", [])
            .unwrap();
        assert!(std::fs::metadata(&wal).unwrap().len() > 0);
        // No log at all: nothing to do.
        let gone = dir.path().join("none.db-wal");
        assert_eq!(bound_wal(&conn, &gone, 0, wait).unwrap(), WalBound::Under);
    }

    /// The ledger writer itself keeps its log under the limit while it
    /// commits, and loses nothing doing so.
    #[tokio::test]
    async fn the_writer_truncates_its_log_past_the_limit() {
        let (_dir, path, url) = migrated_db().await;
        let writer = Writer::start_with(&url, 32 * 1024, super::Relay::DEFAULT)
            .unwrap()
            .unwrap();
        let wal = wal_path(&path);
        let (mut largest, mut shrank, mut taken) = (0, false, 0);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !shrank || taken < 50 {
            assert!(
                Instant::now() < deadline,
                "the log never shrank (largest {largest} bytes)"
            );
            let op = Op::TakeDaily {
                key_id: format!("key-{taken}"),
                day: "2026-11-28".into(),
                limit: 5,
            };
            // Committed before the answer, as for a request.
            assert!(matches!(
                writer.call(op).await.unwrap(),
                Reply::Daily(Some(1))
            ));
            taken += 1;
            let size = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
            shrank |= size < largest;
            largest = largest.max(size);
        }
        assert!(
            largest > 32 * 1024,
            "the log never passed the limit: {largest}"
        );
        drop(writer);
        let conn = Connection::open(&path).unwrap();
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM daily_counters", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, taken);
    }

    /// The checkpoint sequence number in a write-ahead log's header: it
    /// counts the times the writer's connection started the log again from
    /// its beginning. `None` while there is no header to read (no log yet,
    /// or one just truncated whose first frame is not written).
    fn wal_sequence(wal: &std::path::Path) -> Option<u32> {
        use std::io::Read;
        let mut header = [0u8; 16];
        std::fs::File::open(wal)
            .and_then(|mut f| f.read_exact(&mut header))
            .ok()
            .map(|()| u32::from_be_bytes([header[12], header[13], header[14], header[15]]))
    }

    /// Under steady load (commits back to back, from many callers) the
    /// log starts again from its beginning at every checkpoint, well under
    /// its limit, so it stays small without being truncated. A checkpoint
    /// on another connection (a thread of its own, before) was often not
    /// complete when a commit began, and then the log grew on.
    ///
    /// Each caller counts against a key of its own, as requests count
    /// against their API key: a commit rewrites a page or two. (Until the
    /// seventeenth machine every operation inserted a row of a new key, 64
    /// apart: in a debug build the log grew by 700 MB a second, every
    /// checkpoint found it past its limit and truncated it, and a
    /// truncation moves the header's sequence number too, so the test
    /// passed without a single restart; it failed only when its last
    /// reading fell in the moment a truncated log had no header yet. The
    /// earlier design's 5 restarts in 12 turns were counted that way too.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_log_starts_again_under_steady_load() {
        let (_dir, path, url) = migrated_db().await;
        let writer = std::sync::Arc::new(started(&url));
        let wal = wal_path(&path);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut callers = Vec::new();
        for c in 0..64 {
            let (writer, stop) = (writer.clone(), stop.clone());
            callers.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let op = Op::TakeDaily {
                        key_id: format!("key-{c}"),
                        day: "2026-11-28".into(),
                        limit: i64::MAX,
                    };
                    writer.call(op).await.unwrap();
                    n += 1;
                }
                n
            }));
        }
        // Twelve checkpoints' time: at least nine restarts. The header is
        // read every few milliseconds and the steps between two readings
        // added up; the log's size is watched too, for a truncation (the
        // header counts those as well). In a debug build here: 11
        // restarts, the log at most 5.8–8.3 MB, beside two busy loops too.
        let window = super::CHECKPOINT_EVERY * 12;
        let end = Instant::now() + window;
        let (mut restarts, mut last, mut largest, mut emptied) = (0u32, None, 0u64, 0u32);
        while Instant::now() < end {
            let size = std::fs::metadata(&wal).map_or(0, |m| m.len());
            emptied += u32::from(size < 16 && largest >= 16);
            largest = largest.max(size);
            if let Some(seq) = wal_sequence(&wal) {
                if let Some(prev) = last {
                    restarts += seq.wrapping_sub(prev);
                }
                last = Some(seq);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut taken = 0;
        for c in callers {
            taken += c.await.unwrap();
        }
        let seen = format!(
            "{taken} operations; the log at most {largest} bytes, seen emptied {emptied} times"
        );
        assert!(
            restarts >= 9,
            "the log started again {restarts} times in {window:?} of steady load ({seen})"
        );
        assert_eq!(emptied, 0, "the log was truncated ({seen})");
        assert!(largest < super::WAL_LIMIT / 2, "the log grew ({seen})");
    }

    /// Once every handle is gone the writer copies the whole log into the
    /// database and empties it: the log does not outlive the writer.
    #[tokio::test]
    async fn the_log_is_emptied_when_the_writer_ends() {
        let (_dir, path, url) = migrated_db().await;
        let writer = started(&url);
        for n in 0..20 {
            let op = Op::TakeDaily {
                key_id: format!("key-{n}"),
                day: "2026-11-28".into(),
                limit: 5,
            };
            writer.call(op).await.unwrap();
        }
        let wal = wal_path(&path);
        assert!(std::fs::metadata(&wal).map_or(0, |m| m.len()) > 0);
        // Another connection stays open, as the store's readers do: SQLite
        // then leaves the log to the writer when the writer's closes.
        let reader = Connection::open(&path).unwrap();
        let _: i64 = reader
            .query_row("SELECT COUNT(*) FROM daily_counters", [], |r| r.get(0))
            .unwrap();
        drop(writer);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let size = std::fs::metadata(&wal).map_or(0, |m| m.len());
            if size == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the log still holds {size} bytes"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let rows: i64 = reader
            .query_row("SELECT COUNT(*) FROM daily_counters", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 20);
    }

    /// After `Store::close` the writer writes no reservation rows of its
    /// own: a reservation still unwritten then is not written a second
    /// later, after a store opened again may have recovered the closed
    /// one's reservations.
    #[tokio::test]
    async fn a_closed_store_writes_no_reservation_rows_later() {
        let (_dir, path, store, user) = funded_store(1_000).await;
        assert!(store.reserve("r1", &user, 7, "o").await.unwrap());
        store.close().await;
        // The writer looks for reservations to write every sweep.
        tokio::time::sleep(super::HOLD_UNWRITTEN + super::SWEEP * 3).await;
        let conn = Connection::open(&path).unwrap();
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM reservations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0, "a reservation row written after close");
        drop(store);
    }

    /// `Store::close` returns with the write-ahead log copied into the
    /// database file and empty, and the closed writer (whose thread ends
    /// only once the store is dropped) leaves the log alone from then on:
    /// a store opened again in the same process writes to that same log,
    /// and the old writer's checkpoints and last full copy used to
    /// truncate it under the new one (which showed as restarts of the log
    /// a test had not caused).
    #[tokio::test]
    async fn a_closed_writer_leaves_the_log_alone() {
        let (_dir, path, store, user) = funded_store(1).await;
        let wal = wal_path(&path);
        for _ in 0..20 {
            store.add_funds(&user, 1).await.unwrap();
        }
        let before = std::fs::metadata(&wal).map_or(0, |m| m.len());
        assert!(before > 0, "the writes went through the log");
        store.close().await;
        assert_eq!(
            std::fs::metadata(&wal).map_or(0, |m| m.len()),
            0,
            "the log was not emptied by the close"
        );
        // Another writer's frames in the same log, then the old store's
        // checkpoint time passes and it is dropped: its thread ends.
        let other = Connection::open(&path).unwrap();
        other.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        other
            .execute_batch("CREATE TABLE later (v INTEGER); INSERT INTO later VALUES (1);")
            .unwrap();
        let written = std::fs::metadata(&wal).unwrap().len();
        assert!(written > 0);
        tokio::time::sleep(super::CHECKPOINT_EVERY * 3).await;
        drop(store);
        tokio::time::sleep(super::SWEEP * 3).await;
        assert_eq!(
            std::fs::metadata(&wal).unwrap().len(),
            written,
            "the closed writer truncated another connection's log"
        );
    }

    /// Closed and dropped, a store's writer closes its connection, and
    /// `ledger_closed` says when: waited for, the last connection's close
    /// has removed the `-wal` file (a process that exits sooner leaves it,
    /// emptied). Not before every clone is gone.
    #[tokio::test]
    async fn the_ledger_says_when_its_connection_is_closed() {
        let (_dir, path, store, user) = funded_store(1).await;
        let wal = wal_path(&path);
        store.add_funds(&user, 1).await.unwrap();
        let closed = store.ledger_closed();
        let clone = store.clone();
        store.close().await;
        drop(store);
        let mut closed = std::pin::pin!(closed);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), closed.as_mut())
                .await
                .is_err(),
            "a clone still holds the writer"
        );
        drop(clone);
        tokio::time::timeout(Duration::from_secs(10), closed)
            .await
            .expect("the writer's connection was not closed");
        assert!(!wal.exists(), "the -wal file was left behind");
    }

    /// A reader holding an old snapshot (another process's, say) keeps
    /// the close's full copy from emptying the log: the close gives up on
    /// it after [`CLOSE_COPY_WAIT`] rather than the writer's whole busy
    /// timeout, and loses nothing.
    #[tokio::test]
    async fn a_reader_does_not_hold_the_close_for_long() {
        let (_dir, path, store, user) = funded_store(5).await;
        let entries = |conn: &Connection| -> i64 {
            conn.query_row("SELECT COUNT(*) FROM ledger_entries", [], |r| r.get(0))
                .unwrap()
        };
        let reader = Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let seen = entries(&reader);
        store.add_funds(&user, 7).await.unwrap();
        tokio::time::timeout(super::BUSY_TIMEOUT / 2, store.close())
            .await
            .expect("the close waited for the reader as long as for a lock");
        assert!(
            std::fs::metadata(wal_path(&path)).unwrap().len() > 0,
            "the log was emptied under a reader"
        );
        assert_eq!(entries(&reader), seen, "the reader's snapshot moved");
        reader.execute_batch("COMMIT").unwrap();
        assert_eq!(entries(&Connection::open(&path).unwrap()), seen + 2);
    }

    /// A store on a fresh migrated database (see [`migrated_db`]) with a
    /// paid user funded with `amount`: the directory (to keep), the
    /// database's path, the store and the user's id.
    async fn funded_store(amount: i64) -> (tempfile::TempDir, PathBuf, crate::Store, String) {
        let (dir, path, url) = migrated_db().await;
        let store = crate::Store::open(&url).await.unwrap();
        let user = store.create_user("p", "paid").await.unwrap();
        store.add_funds(&user, amount).await.unwrap();
        (dir, path, store, user)
    }

    /// A writer on the file database at `url`, with the default limits.
    fn started(url: &str) -> Writer {
        started_with(url, super::Relay::DEFAULT)
    }

    /// A writer on the file database at `url`, with the default log limit
    /// and `relay`'s thresholds.
    fn started_with(url: &str, relay: super::Relay) -> Writer {
        Writer::start_with(url, super::WAL_LIMIT, relay)
            .unwrap()
            .expect("a file database")
    }

    /// A database in a fresh temporary directory, with the schema by the
    /// store's own migrations: the directory (to keep), the database's
    /// path and its URL.
    async fn migrated_db() -> (tempfile::TempDir, PathBuf, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let url = format!("sqlite://{}?mode=rwc", path.display());
        // Closed, its writer leaves the log alone, though its thread ends
        // only later (see `a_closed_writer_leaves_the_log_alone`).
        crate::Store::open(&url).await.unwrap().close().await;
        (dir, path, url)
    }

    /// Nice values of this process's threads with the given name.
    #[cfg(target_os = "linux")]
    fn nice_of(name: &str) -> Vec<i32> {
        let mut found = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim_end() != name {
                continue;
            }
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap();
            // Field 19 (nice), counted after the parenthesised name.
            let after = &stat[stat.rfind(')').unwrap() + 2..];
            found.push(after.split(' ').nth(16).unwrap().parse().unwrap());
        }
        found
    }

    /// The quiet writer runs at a lower priority than the request threads
    /// (see `BACKGROUND_NICE`), and still commits; the catch-up writer
    /// keeps the priority it was started with.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_ledger_threads_yield_to_request_threads() {
        let (_dir, _, url) = migrated_db().await;
        let writer = started(&url);
        let op = Op::TakeDaily {
            key_id: "k".into(),
            day: "2026-11-28".into(),
            limit: 1,
        };
        // Answered after its commit: the thread has set its priority.
        assert!(matches!(
            writer.call(op).await.unwrap(),
            Reply::Daily(Some(1))
        ));
        let mine = rustix::process::getpriority_process(None).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        // A thread names itself once it first runs: the idle catch-up
        // thread may not have run yet on busy cores.
        loop {
            let catch_up = nice_of("sluice-catchup");
            if !catch_up.is_empty() {
                assert!(
                    catch_up.iter().all(|n| *n == mine),
                    "{catch_up:?}, not {mine}"
                );
                break;
            }
            assert!(Instant::now() < deadline, "no catch-up writer thread");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        loop {
            let ledger = nice_of("sluice-ledger");
            // Other tests in this binary start writers too: all of them.
            if !ledger.is_empty() && ledger.iter().all(|n| *n == super::BACKGROUND_NICE) {
                break;
            }
            assert!(Instant::now() < deadline, "ledger {ledger:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A writer held up (here by another connection's write lock) fills
    /// its queue and then says it is backlogged, so that the API turns new
    /// requests away; once it catches up it answers everything queued and
    /// says so no longer. (Held up for good here: only the full queue
    /// counts, not how long the commit has taken.)
    #[tokio::test]
    async fn a_writer_that_falls_behind_says_so_until_it_catches_up() {
        let (_dir, path, url) = migrated_db().await;
        let relay = super::Relay {
            stuck_after: Duration::MAX,
            ..super::Relay::DEFAULT
        };
        let writer = Arc::new(started_with(&url, relay));
        assert!(!writer.backlogged());
        let blocker = Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let first = held_up(&writer).await;
        let mut waiting = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !writer.backlogged() {
            assert!(
                Instant::now() < deadline,
                "not backlogged after {} operations",
                waiting.len()
            );
            waiting.push(balance_later(&writer, waiting.len()));
            // Lets the spawned callers queue their operations.
            tokio::task::yield_now().await;
        }
        assert!(waiting.len() >= super::QUEUE, "{}", waiting.len());
        blocker.execute_batch("ROLLBACK").unwrap();
        assert_answered(first, waiting).await;
        assert!(!writer.backlogged());
    }

    /// Queues a write whose commit (with `blocker`'s lock held) holds the
    /// writer up, and returns once the writer has taken it and has been
    /// in its commit for a while (a free writer answers reads as they come).
    async fn held_up(writer: &Arc<Writer>) -> tokio::task::JoinHandle<Result<Reply>> {
        let w = writer.clone();
        let first = tokio::spawn(async move { w.call(Op::Close).await });
        let started = Instant::now();
        while !writer.tx.is_empty() || writer.busy.so_far() < Duration::from_millis(100) {
            assert!(started.elapsed() < Duration::from_secs(10), "never held up");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        first
    }

    /// Queues a read of the `i`th user's balance: answered at once by a
    /// free writer, it waits in the queue behind a held-up one.
    fn balance_later(writer: &Arc<Writer>, i: usize) -> tokio::task::JoinHandle<Result<Reply>> {
        let w = writer.clone();
        tokio::spawn(async move {
            w.call(Op::Balance {
                user_id: format!("u{i}"),
            })
            .await
        })
    }

    /// The write of [`held_up`] and every read of [`balance_later`] were
    /// answered.
    async fn assert_answered(
        first: tokio::task::JoinHandle<Result<Reply>>,
        waiting: Vec<tokio::task::JoinHandle<Result<Reply>>>,
    ) {
        assert!(matches!(first.await.unwrap().unwrap(), Reply::Done));
        for op in waiting {
            assert!(matches!(op.await.unwrap().unwrap(), Reply::Balance { .. }));
        }
    }

    /// Once full, the queue must drain to half before the writer stops
    /// counting as behind: the writer taking one more batch from a full
    /// queue does not let requests in.
    #[test]
    fn a_full_queue_stays_backlogged_until_half_of_it_drains() {
        let b = super::Backlog::default();
        let q = super::QUEUE;
        assert!(!b.observe(0, false));
        assert!(!b.observe(q - 1, false));
        assert!(b.observe(q, false));
        assert!(b.observe(q - super::BATCH, false));
        assert!(b.observe(super::BACKLOG_CLEARS_AT + 1, false));
        assert!(!b.observe(super::BACKLOG_CLEARS_AT, false));
        // Cleared: filling again up to just below full is not behind.
        assert!(!b.observe(q - 1, false));
        assert!(b.observe(q, false));
        assert!(!b.observe(0, false));
        // A stuck commit is behind whatever the queue holds, and the queue
        // then has to drain as far as after a full one.
        assert!(b.observe(1, true));
        assert!(b.observe(super::BACKLOG_CLEARS_AT + 1, false));
        assert!(!b.observe(super::BACKLOG_CLEARS_AT, false));
    }

    /// A commit held up for less than `stuck_after` (here by another
    /// connection's write lock, as a slow disk flush would) lets more
    /// operations queue than the old limit of 4,096 without the writer
    /// counting as behind, so the API keeps taking requests; once the
    /// commit has taken `stuck_after` with work waiting, it is behind;
    /// once the lock goes it answers everything and is not.
    #[tokio::test]
    async fn a_short_stall_is_ridden_out_and_a_long_one_is_not() {
        let (_dir, path, url) = migrated_db().await;
        let stuck_after = Duration::from_millis(1500);
        let relay = super::Relay {
            stuck_after,
            ..super::Relay::DEFAULT
        };
        let writer = Arc::new(started_with(&url, relay));
        let blocker = Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let held = Instant::now();
        let first = held_up(&writer).await;
        let mut waiting = Vec::new();
        for i in 0..6000 {
            waiting.push(balance_later(&writer, i));
            tokio::task::yield_now().await;
        }
        let queued = writer.tx.len();
        let backlogged = writer.backlogged();
        // What follows only holds if the queue filled within the wait.
        if held.elapsed() < stuck_after {
            assert!(queued > 4096, "{queued}");
            assert!(!backlogged, "behind after {:?}", held.elapsed());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !writer.backlogged() {
            assert!(Instant::now() < deadline, "not behind while stuck");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(held.elapsed() >= stuck_after, "{:?}", held.elapsed());
        blocker.execute_batch("ROLLBACK").unwrap();
        assert_answered(first, waiting).await;
        assert!(!writer.backlogged());
    }

    /// Thresholds for the churn tests: the quiet thread hands over before
    /// every commit, the catch-up thread back after every commit.
    const CHURN: super::Relay = super::Relay {
        behind_at: 1,
        kept_up_below: usize::MAX,
        hold: Duration::ZERO,
        min_idle_pct: 0.0,
        max_wait_per_run: f64::INFINITY,
        stuck_after: super::STUCK_AFTER,
    };

    /// With thresholds that make the writer threads hand the connection
    /// to each other between nearly every two batches, every operation is
    /// still answered once and committed once: daily units taken from
    /// many tasks add up, and reservations and settlements balance.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn operations_survive_hand_overs_between_the_writer_threads() {
        let (_dir, path, url) = migrated_db().await;
        let writer = Arc::new(started_with(&url, CHURN));
        const TASKS: usize = 64;
        const EACH: usize = 40;
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let w = writer.clone();
            tasks.push(tokio::spawn(async move {
                let mut last = 0;
                for _ in 0..EACH {
                    let op = Op::TakeDaily {
                        key_id: format!("k{}", t % 8),
                        day: "2026-11-28".into(),
                        limit: i64::MAX,
                    };
                    match w.call(op).await.unwrap() {
                        Reply::Daily(Some(used)) => {
                            assert!(used > last, "{used} after {last}");
                            last = used;
                        }
                        other => panic!("{other:?}"),
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(matches!(writer.call(Op::Close).await.unwrap(), Reply::Done));
        let handovers = writer.handovers();
        eprintln!("{handovers} hand-overs");
        assert!(handovers >= 10, "only {handovers} hand-overs");
        let conn = Connection::open(&path).unwrap();
        let mut st = conn
            .prepare("SELECT key_id, used FROM daily_counters ORDER BY key_id")
            .unwrap();
        let rows: Vec<(String, i64)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(rows.len(), 8);
        for (key, used) in rows {
            assert_eq!(used, (TASKS / 8 * EACH) as i64, "{key}");
        }
    }

    /// Reservations, settlements and releases from many tasks, with the
    /// writer threads handing the connection (and the reservations granted
    /// and not yet written) to each other between nearly every two
    /// batches: the ledger balances, every settled request is charged
    /// once, and nothing stays reserved.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn money_survives_hand_overs_between_the_writer_threads() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("s.db").display());
        let store = crate::Store::open_with(&url, CHURN).await.unwrap();
        let user = store.create_user("p", "paid").await.unwrap();
        const FUNDS: i64 = 1_000_000;
        store.add_funds(&user, FUNDS).await.unwrap();
        // Each task's requests one after another: every settlement waits
        // for a commit, so there are many batches to hand over between.
        const TASKS: usize = 30;
        const ROUNDS: usize = 20;
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let (store, user) = (store.clone(), user.clone());
                tokio::spawn(async move {
                    let mut settled = 0;
                    for r in 0..ROUNDS {
                        let id = format!("r{t}-{r}");
                        assert!(store.reserve(&id, &user, 7, "o").await.unwrap());
                        if (t + r) % 3 == 0 {
                            store.release(&id).await.unwrap();
                            continue;
                        }
                        let s = Settlement {
                            request_id: id,
                            user_id: user.clone(),
                            user_pays: true,
                            cost: 5,
                            credits: vec![("m".into(), 4)],
                            fee: 1,
                        };
                        assert!(store.settle(&s).await.unwrap());
                        // Settled once only.
                        assert!(!store.settle(&s).await.unwrap());
                        settled += 1;
                    }
                    settled
                })
            })
            .collect();
        let mut settled = 0;
        for t in tasks {
            settled += t.await.unwrap();
        }
        let handovers = store.ledger_handovers();
        eprintln!("{handovers} hand-overs");
        assert!(handovers >= 10, "only {handovers} hand-overs");
        let check = store.ledger_check().await.unwrap();
        assert!(check.is_balanced(), "{check:?}");
        assert_eq!(check.settlements, settled);
        assert_eq!(check.user_debits, 5 * settled);
        assert_eq!(check.open_reservations, 0);
        let bal = store.balance(&user).await.unwrap();
        assert_eq!(bal.ledger, FUNDS - 5 * settled);
        assert_eq!(bal.reserved, 0);
        store.close().await;
    }

    /// A quiet thread that gives up during a batch (it fell behind) rolls
    /// all of it back: nothing of it is written, and the same batch
    /// commits in full afterwards, on whichever thread.
    #[tokio::test]
    async fn a_batch_given_up_midway_writes_nothing() {
        let (_dir, path, _) = migrated_db().await;
        let conn = super::open(&path).unwrap();
        let batch: Vec<super::Work> = (0..10)
            .map(|i| super::Work::Job {
                job: Box::new(super::Job {
                    op: Op::TakeDaily {
                        key_id: format!("k{i}"),
                        day: "2026-11-28".into(),
                        limit: 5,
                    },
                    reply: None,
                }),
                unwritten: None,
            })
            .collect();
        let rows = |conn: &Connection| -> i64 {
            conn.query_row("SELECT COUNT(*) FROM daily_counters", [], |r| r.get(0))
                .unwrap()
        };
        let mut db = Prepared::new(&conn);
        let asked = std::cell::Cell::new(0);
        let give_up = || {
            asked.set(asked.get() + 1);
            asked.get() >= 3
        };
        assert!(matches!(
            super::run_batch(&mut db, &batch, false, Some(&give_up)),
            super::Ran::GaveUp
        ));
        assert_eq!(asked.get(), 3, "asked after every yield until it gave up");
        assert!(conn.is_autocommit());
        assert_eq!(rows(&conn), 0);
        assert_eq!(
            super::commit_batch(&mut db, &batch, Some(&|| true)).map(|r| r.len()),
            None
        );
        assert_eq!(rows(&conn), 0);
        let results = super::commit_batch(&mut db, &batch, Some(&|| false)).unwrap();
        assert!(results
            .iter()
            .all(|r| matches!(r, Ok(Reply::Daily(Some(1))))));
        assert_eq!(rows(&conn), 10);
    }

    fn entries_count(conn: &Connection) -> i64 {
        conn.query_row("SELECT COUNT(*) FROM ledger_entries", [], |r| r.get(0))
            .unwrap()
    }

    /// The writer inserts a settlement's entries `OR FAIL` (no statement
    /// journal): a row that fails keeps the rows before it, so the item's
    /// savepoint, or the batch's transaction, must be what undoes them.
    #[test]
    fn entries_that_fail_midway_are_undone_by_the_item_savepoint() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE ledger_entries (id TEXT PRIMARY KEY, txn TEXT NOT NULL, \
             account TEXT NOT NULL, amount BIGINT NOT NULL, kind TEXT NOT NULL, \
             created_ms BIGINT NOT NULL)",
        )
        .unwrap();
        let s = Settlement {
            request_id: "r1".into(),
            user_id: "u".into(),
            user_pays: true,
            cost: 60,
            credits: vec![("m".into(), 50)],
            fee: 10,
        };
        let (stmt, moved) = sql::settlement_parts(&s, 1, OnError::Fail).unwrap();
        assert!(stmt.sql.starts_with("INSERT OR FAIL INTO ledger_entries"));
        assert_eq!(moved.iter().map(|(_, a)| a).sum::<i64>(), 0);
        let (portable, _) = sql::settlement_parts(&s, 1, OnError::Abort).unwrap();
        assert!(portable.sql.starts_with("INSERT INTO ledger_entries"));

        // Make the third row collide: the first two are written, then the
        // statement fails.
        // Values: the first row's six, then four per row (id first).
        let third_id = match &stmt.vals[10] {
            sql::Val::Text(id) => id.clone(),
            other => panic!("unexpected value {other:?}"),
        };
        conn.execute(
            "INSERT INTO ledger_entries VALUES (?1, 'x', 'a', 0, 'k', 0)",
            [&third_id],
        )
        .unwrap();
        let mut db = Prepared::new(&conn);
        db.run("BEGIN").unwrap();
        db.run("SAVEPOINT item").unwrap();
        assert!(db.exec(&stmt).is_err());
        assert_eq!(
            entries_count(&conn),
            3,
            "OR FAIL keeps the rows before the failure"
        );
        db.run("ROLLBACK TO item").unwrap();
        db.run("RELEASE item").unwrap();
        assert_eq!(
            entries_count(&conn),
            1,
            "the item's savepoint undoes its rows"
        );
        assert!(db.exec(&stmt).is_err());
        db.rollback();
        assert!(conn.is_autocommit());
        assert_eq!(
            entries_count(&conn),
            1,
            "the batch's rollback undoes them too"
        );
    }

    #[test]
    fn paths_from_urls() {
        assert_eq!(
            sqlite_path("sqlite:///tmp/x/sluice.db?mode=rwc"),
            Some(PathBuf::from("/tmp/x/sluice.db"))
        );
        assert_eq!(
            sqlite_path("sqlite:data.db"),
            Some(PathBuf::from("data.db"))
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("sqlite://x.db?mode=memory"), None);
        assert_eq!(sqlite_path("postgres://h/db"), None);
    }
}
