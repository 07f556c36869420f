//! The closed sets of values gorp stores as text: job states and sources, event kinds,
//! permission policies, a schedule's catch-up and overlap policies, warm-session states.
//!
//! Each is an enum written once with [`text_enum!`]: one `as_str` (the text in the database,
//! the JSON and the config), `Display`, and a `FromStr` whose error names every value. They
//! sit below every other module, so the store, the ACP layer and the front ends share them.

/// Declares an enum whose variants are stored and shown as fixed strings.
macro_rules! text_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident ($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
            sqlx::Type, utoipa::ToSchema,
        )]
        // The stored text is the variant's name in snake_case (the tests check `as_str`
        // against serde); serde, sqlx and the OpenAPI schema all read `rename_all`.
        #[serde(rename_all = "snake_case")]
        #[sqlx(type_name = "TEXT", rename_all = "snake_case")]
        $vis enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stored text.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text ),+
                }
            }
        }

        // The command line lists and completes the values (`--state <STATE>
        // [possible values: queued, …]`).
        impl clap::ValueEnum for $name {
            fn value_variants<'a>() -> &'a [Self] {
                $name::ALL
            }

            fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                Some(clap::builder::PossibleValue::new(self.as_str()))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                $name::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| {
                        let names: Vec<&str> = $name::ALL.iter().map(|v| v.as_str()).collect();
                        format!("unknown {} {s:?}; expected {}", $what, one_of(&names))
                    })
            }
        }
    };
}

/// `a`, `a or b`, `a, b or c`.
pub fn one_of(names: &[&str]) -> String {
    match names.split_last() {
        None => String::new(),
        Some((last, [])) => (*last).to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

text_enum! {
    /// ```text
    ///            claim              complete
    ///  queued ──────────► running ──────────► succeeded
    ///    ▲  ▲                │ │ │
    ///    │  └── retry/rescue ┘ │ └──────────► failed     (attempts spent, or not retryable)
    ///    │      release        │
    ///    └─────────────────────┘ cancel ────► cancelled  (queued: at once; running: by its worker)
    /// ```
    pub enum JobState ("job state") {
        Queued = "queued",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

text_enum! {
    /// Where a job came from.
    pub enum Source ("source") {
        Webhook = "webhook",
        Matrix = "matrix",
        Schedule = "schedule",
        Cli = "cli",
    }
}

text_enum! {
    /// How an agent's permission requests are answered.
    pub enum PermissionPolicy ("permission policy") {
        /// Pick an allow option (`allow_once`, else `allow_always`); cancel if none.
        Allow = "allow",
        /// Pick a reject option (`reject_once`, else `reject_always`); cancel if none.
        Deny = "deny",
        /// Ask a person: the request becomes an approval row decided from Matrix, HTTP or the
        /// CLI (or by a standing rule, or denied when it times out).
        Ask = "ask",
    }
}

impl Default for PermissionPolicy {
    /// `allow`, the default of `[acp] permission_policy`.
    fn default() -> Self {
        PermissionPolicy::Allow
    }
}

text_enum! {
    /// ```text
    ///  pending ──► allowed | denied     (a permission request)
    ///          ──► answered | declined  (a question)
    ///          ──► expired | cancelled  (either)
    /// ```
    /// `expired`: gorp stopped (or the attempt ended) while it waited; `cancelled`: the job was
    /// cancelled or the agent withdrew the request.
    pub enum ApprovalState ("approval state") {
        Pending = "pending",
        Allowed = "allowed",
        Denied = "denied",
        /// A question answered (the agent gets the content).
        Answered = "answered",
        /// A question declined (by a person, or by the timeout).
        Declined = "declined",
        Expired = "expired",
        Cancelled = "cancelled",
    }
}

text_enum! {
    /// What an approval row asks a person.
    pub enum RequestKind ("request kind") {
        /// The agent's `session/request_permission`: allow or deny a tool call.
        Permission = "permission",
        /// The agent's `elicitation/create` form: answer its questions or decline.
        Question = "question",
    }
}

text_enum! {
    /// How an approval was decided.
    pub enum DecidedVia ("decision channel") {
        Matrix = "matrix",
        Http = "http",
        Cli = "cli",
        /// A standing "allow always" rule of the channel.
        Rule = "rule",
        /// `[acp] approval_timeout_secs` passed: denied.
        Timeout = "timeout",
        /// gorp stopped while the request was pending: expired.
        Restart = "restart",
        /// The job's attempt ended (cancelled, failed, the agent withdrew the request).
        Job = "job",
    }
}

text_enum! {
    /// The kernel sandbox an agent runs in (`[acp] sandbox`, per channel).
    pub enum SandboxMode ("sandbox") {
        /// Landlock: writes confined to the workspace and the agent's own directories, gorp's
        /// files unreadable (see `sandbox`).
        Landlock = "landlock",
        /// No sandbox: the agent can do whatever gorp's user can.
        None = "none",
    }
}

text_enum! {
    /// What a schedule does with slots missed while gorp was down (more than a minute late).
    pub enum CatchUp ("catch-up policy") {
        /// None of them run; the skip is recorded.
        Skip = "skip",
        /// The latest of them runs once.
        Once = "once",
        /// Every one runs (bounded).
        All = "all",
    }
}

text_enum! {
    /// What a schedule does when its previous run is still queued or running.
    pub enum Overlap ("overlap policy") {
        /// The slot is skipped and the skip recorded.
        Skip = "skip",
        /// The slot's job is queued behind the running one.
        Queue = "queue",
    }
}

text_enum! {
    /// The state of a warm-session row. `busy` is shown, never stored: a warm session whose
    /// channel has a running job.
    pub enum WarmState ("warm-session state") {
        Stopped = "stopped",
        Starting = "starting",
        Warm = "warm",
        Busy = "busy",
        Failed = "failed",
    }
}

text_enum! {
    /// The kinds of job event gorp writes or reads. An ACP update that gorp does not know keeps
    /// its wire tag as its kind, so the `kind` column is open; these are the ones gorp names.
    pub enum EventKind ("event kind") {
        /// The worker started an attempt.
        Started = "started",
        /// The attempt's agent session (warm or cold, pid).
        Session = "session",
        /// A chunk of the agent's reply.
        Message = "message",
        Thought = "thought",
        UserMessage = "user_message",
        ToolCall = "tool_call",
        ToolCallUpdate = "tool_call_update",
        Plan = "plan",
        Commands = "commands",
        Mode = "mode",
        Config = "config",
        SessionInfo = "session_info",
        /// Context usage (`usage_update`).
        Usage = "usage",
        /// The turn's token counts.
        TurnUsage = "turn_usage",
        /// A permission request and how it was answered.
        Permission = "permission",
        /// A permission request under `ask`, waiting for a person (its approval row).
        PermissionRequest = "permission_request",
        /// A question from the agent (`elicitation/create`) under `ask`, waiting for a person.
        Question = "question",
        /// How a question from the agent was answered (`accept`, `decline` or `cancel`).
        Answer = "answer",
        FsRead = "fs_read",
        FsWrite = "fs_write",
        FsDenied = "fs_denied",
        FsError = "fs_error",
        /// A line the agent wrote to stderr.
        Stderr = "stderr",
        /// The job's turn passed one of its limits (cost or tokens) and was stopped.
        Budget = "budget",
        /// The job waits in the queue: its channel's daily or monthly budget is spent.
        Held = "held",
        Error = "error",
        /// A failed attempt will run again after its backoff.
        RetryScheduled = "retry_scheduled",
        /// gorp shut down during the attempt; the job runs again after restart.
        Released = "released",
        Rescued = "rescued",
        CancelRequested = "cancel_requested",
        Cancelled = "cancelled",
    }
}

impl PartialEq<EventKind> for str {
    fn eq(&self, kind: &EventKind) -> bool {
        self == kind.as_str()
    }
}

impl PartialEq<EventKind> for String {
    fn eq(&self, kind: &EventKind) -> bool {
        self == kind.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_round_trips_and_errors_name_the_choices() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>(), Ok(*s));
        }
        fn same_text<T>(all: &[T], as_str: fn(&T) -> &'static str)
        where
            T: serde::Serialize + utoipa::ToSchema + std::fmt::Debug,
        {
            let schema = serde_json::to_value(T::schema()).unwrap();
            let listed: Vec<&str> = schema["enum"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            let texts: Vec<&str> = all.iter().map(as_str).collect();
            assert_eq!(listed, texts, "the OpenAPI schema lists the stored texts");
            for v in all {
                assert_eq!(serde_json::to_value(v).unwrap(), as_str(v), "{v:?}");
            }
        }
        same_text(JobState::ALL, |v| v.as_str());
        same_text(Source::ALL, |v| v.as_str());
        same_text(PermissionPolicy::ALL, |v| v.as_str());
        same_text(CatchUp::ALL, |v| v.as_str());
        same_text(Overlap::ALL, |v| v.as_str());
        same_text(WarmState::ALL, |v| v.as_str());
        same_text(EventKind::ALL, |v| v.as_str());
        same_text(ApprovalState::ALL, |v| v.as_str());
        same_text(DecidedVia::ALL, |v| v.as_str());
        same_text(RequestKind::ALL, |v| v.as_str());
        same_text(SandboxMode::ALL, |v| v.as_str());
        for k in EventKind::ALL {
            assert_eq!(k.to_string().parse::<EventKind>(), Ok(*k));
        }
        assert_eq!(
            "x".parse::<JobState>().unwrap_err(),
            "unknown job state \"x\"; expected queued, running, succeeded, failed or cancelled"
        );
        assert_eq!(
            "x".parse::<PermissionPolicy>().unwrap_err(),
            "unknown permission policy \"x\"; expected allow, deny or ask"
        );
        let kind = String::from("tool_call");
        assert!(kind == EventKind::ToolCall);
        assert!(*"message" == EventKind::Message);
    }
}
