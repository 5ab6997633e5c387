//! What a backend can do, declared rather than inferred from its name.

/// The abilities of a backend. Callers (the worker runtime, the conformance
/// suite) branch on these, never on which backend they hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Capabilities {
    /// Jobs survive a restart of the process.
    pub durable: bool,
    /// Several processes may share the store at once.
    pub multi_process: bool,
    /// `now` comes from the database server unless a clock is injected.
    pub server_clock: bool,
    /// Jobs can be enqueued inside the caller's own database transaction.
    pub transactional_enqueue: bool,
    /// A push wakes workers in other processes (e.g. LISTEN/NOTIFY).
    pub cross_process_wakeups: bool,
    /// A push wakes workers in the same process that share the backend value.
    pub in_process_wakeups: bool,
    /// A write (and a pull) is a call into this process, not a round trip
    /// to a server or a file: the worker records each completion as its
    /// handler returns instead of gathering them into batches, and a lane
    /// of running jobs pulls for itself when it runs out, its other jobs
    /// waiting meanwhile; and a batch of completions that failed is not
    /// sent again (a call into this process has no failure that passes).
    /// A wrapper that adds latency or failures to a backend that declares
    /// it (a proxy, a fault injector) should clear it.
    pub instant_writes: bool,
}

impl Capabilities {
    /// No optional ability; switch each one on with the setters.
    pub const fn none() -> Self {
        Self {
            durable: false,
            multi_process: false,
            server_clock: false,
            transactional_enqueue: false,
            cross_process_wakeups: false,
            in_process_wakeups: false,
            instant_writes: false,
        }
    }

    /// Sets [`Self::durable`].
    pub const fn durable(mut self, yes: bool) -> Self {
        self.durable = yes;
        self
    }

    /// Sets [`Self::multi_process`].
    pub const fn multi_process(mut self, yes: bool) -> Self {
        self.multi_process = yes;
        self
    }

    /// Sets [`Self::server_clock`].
    pub const fn server_clock(mut self, yes: bool) -> Self {
        self.server_clock = yes;
        self
    }

    /// Sets [`Self::transactional_enqueue`].
    pub const fn transactional_enqueue(mut self, yes: bool) -> Self {
        self.transactional_enqueue = yes;
        self
    }

    /// Sets [`Self::cross_process_wakeups`].
    pub const fn cross_process_wakeups(mut self, yes: bool) -> Self {
        self.cross_process_wakeups = yes;
        self
    }

    /// Sets [`Self::in_process_wakeups`].
    pub const fn in_process_wakeups(mut self, yes: bool) -> Self {
        self.in_process_wakeups = yes;
        self
    }

    /// Sets [`Self::instant_writes`].
    pub const fn instant_writes(mut self, yes: bool) -> Self {
        self.instant_writes = yes;
        self
    }
}
