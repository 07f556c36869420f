//! ACP executor (in progress).
use crate::config::Config;
use crate::executor::{Executor, JobContext, Outcome};
use crate::store::Store;
use futures::future::BoxFuture;
use std::sync::Arc;
pub struct AcpExecutor;
impl AcpExecutor {
    pub fn new(_c: Arc<Config>, _s: Store, _i: String) -> Self {
        AcpExecutor
    }
}
impl Executor for AcpExecutor {
    fn run(&self, _ctx: JobContext) -> BoxFuture<'static, Outcome> {
        Box::pin(async {
            Outcome::Failed {
                error: "ACP executor not built yet".into(),
                retryable: false,
            }
        })
    }
}
