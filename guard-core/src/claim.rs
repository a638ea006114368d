//! The kill claim: while the guard is killing a session's backend, the pump holds back the
//! server's bytes so the client gets lockguard's reason rather than the backend's own
//! termination message. The claim makes sure that hold is always released.

use crate::session::{KillNotice, SessionRecord};

/// Holds a session's `begin_kill` for the duration of one kill; dropping it without
/// [`KillClaim::finish`] withdraws the kill, so a cancelled or failed kill (timeout, identity
/// mismatch, error) never leaves the pump holding back the server's bytes.
pub(crate) struct KillClaim<'a> {
    session: &'a SessionRecord,
    finished: bool,
}

impl<'a> KillClaim<'a> {
    /// Claims the session, waiting out a kill already under way: if that one ends the
    /// session there is nothing left to do (`None`); if it was withdrawn, claim it now.
    pub(crate) async fn acquire(session: &'a SessionRecord) -> Option<KillClaim<'a>> {
        if !session.begin_kill() {
            session.kill_resolved().await?;
            if !session.begin_kill() {
                return None;
            }
        }
        Some(KillClaim {
            session,
            finished: false,
        })
    }

    /// The kill succeeded: the pump sends `notice` to the client and ends the session.
    pub(crate) fn finish(mut self, notice: KillNotice) {
        self.finished = true;
        self.session.finish_kill(notice);
    }
}

impl Drop for KillClaim<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.session.abort_kill();
        }
    }
}
