//! A cloneable "stop now" signal for socket tasks (what mini-redis builds from a broadcast
//! channel, built here on a `watch` so a task that subscribes late still sees it).

use tokio::sync::watch;

/// Fires the signal. Dropping the trigger fires it too, so a task can never outlive
/// the owner that forgot to call [`ShutdownTrigger::trigger`].
#[derive(Debug)]
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

/// Waits for the signal. Cheap to clone; every clone sees the same signal.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// A new trigger and the first listener.
pub fn shutdown_channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
        }
    }
}

impl Shutdown {
    /// Whether the signal has fired (or its trigger is gone).
    pub fn is_shutdown(&self) -> bool {
        *self.rx.borrow() || self.rx.has_changed().is_err()
    }

    /// Resolves once the signal fires (or the trigger is dropped). Cancel-safe.
    pub async fn recv(&mut self) {
        // `Err` means the trigger was dropped: that counts as the signal.
        let _ = self.rx.wait_for(|stop| *stop).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn trigger_and_drop_both_fire() {
        let (t, mut s) = shutdown_channel();
        let late = t.subscribe();
        assert!(!s.is_shutdown());
        t.trigger();
        s.recv().await;
        assert!(late.is_shutdown());

        let (t, mut s) = shutdown_channel();
        drop(t);
        assert!(s.is_shutdown());
        s.recv().await;
    }
}
