//! The metadata thread: one per writable qcow2 disk, running the requests a layer cannot map
//! in place (allocating writes, COW, discard, write-zeroes) and FLUSH.
//!
//! Queue workers never block: they copy a write's data out of guest memory, hand the job here
//! and go on; the reply callback posts the result back to the worker and wakes it through its
//! ring. Everything queued when the thread looks is one batch (`Layer::update_batch`), whose
//! I/O the layer issues in parallel. One thread makes every allocation decision, which is what
//! makes allocating writes to the same guest cluster safe without a lock table; writes to
//! allocated clusters do not come here. On shutdown the thread drains its queue and closes the
//! layer (returning reserved clusters, fdatasync).

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vublk_formats::{FileStorage, Layer, Update};

/// A request for the metadata thread.
#[derive(Debug)]
pub enum UpdateJob {
    /// FLUSH: fdatasync, then the layer releases what waited for it.
    Flush,
    Write {
        offset: u64,
        /// Aligned, so O_DIRECT writes of whole clusters need no copy.
        data: vublk_formats::AlignedBuf,
        len: usize,
    },
    WriteZeroes {
        ranges: Vec<(u64, u64)>,
        unmap: bool,
    },
    Discard {
        ranges: Vec<(u64, u64)>,
    },
}

/// Called on the metadata thread with the job's result (an error is already logged).
pub type UpdateReply = Box<dyn FnOnce(bool) + Send>;

/// A reply that is sent exactly once: with the result, or with failure when the job is dropped
/// unanswered (the metadata thread panicked, or exited with jobs queued), so a queue worker
/// draining its requests never waits for a reply that cannot come.
struct Reply(Option<UpdateReply>);

impl Reply {
    fn send(mut self, ok: bool) {
        if let Some(reply) = self.0.take() {
            reply(ok);
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(reply) = self.0.take() {
            log::error!("a metadata request was dropped unanswered; failing it");
            reply(false);
        }
    }
}

/// The handle to a disk's metadata thread.
#[derive(Debug)]
pub struct Updater {
    tx: Mutex<Option<Sender<(UpdateJob, Reply)>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Updater {
    /// `on_corrupt` is told when an update finds the image inconsistent (it is then marked
    /// corrupt and served read-only).
    pub fn spawn(
        layer: Arc<dyn Layer>,
        on_corrupt: crate::disk::CorruptionHook,
    ) -> std::io::Result<Updater> {
        let (tx, rx) = channel::<(UpdateJob, Reply)>();
        let thread = std::thread::Builder::new()
            .name("vublk-meta".into())
            .spawn(move || {
                crate::sandbox::seccomp::enter(crate::sandbox::seccomp::Role::Meta);
                let storage = FileStorage::new(layer.files());
                // Everything queued runs as one batch: allocations of different requests
                // write their data and metadata in parallel.
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH_JOBS {
                        match rx.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    run_batch(layer.as_ref(), &storage, batch, &on_corrupt);
                }
                if let Err(e) = layer.close(&storage) {
                    log::error!("closing the image: {}", error_chain(&e));
                }
            })?;
        Ok(Updater {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues `job`; false when the thread is gone (the caller fails the request).
    pub fn submit(&self, job: UpdateJob, reply: UpdateReply) -> bool {
        let queued = match &*self.tx.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(tx) => tx.send((job, Reply(Some(reply)))).map_err(|e| {
                // Not queued: the caller fails the request itself, so this reply stays silent.
                let (_, mut reply) = e.0;
                reply.0.take();
            }),
            None => Err(()),
        };
        queued.is_ok()
    }

    /// Lets the thread finish its queue, close the layer and exit; waits for it.
    pub fn shutdown(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            if thread.join().is_err() {
                log::error!("the metadata thread panicked");
            }
        }
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reply")
    }
}

impl Drop for Updater {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Most jobs one batch takes from the queue (64 queue-depth's worth of 4 KiB writes).
const MAX_BATCH_JOBS: usize = 64;

/// Runs `batch` through the layer and replies to each job.
fn run_batch(
    layer: &dyn Layer,
    storage: &FileStorage<'_>,
    batch: Vec<(UpdateJob, Reply)>,
    on_corrupt: &crate::disk::CorruptionHook,
) {
    let mut updates = Vec::new();
    // Which updates belong to which job.
    let mut spans = Vec::with_capacity(batch.len());
    for (job, _) in &batch {
        let start = updates.len();
        match job {
            UpdateJob::Write { offset, data, len } => updates.push(Update::Write {
                offset: *offset,
                data: &data.as_slice()[..*len],
            }),
            UpdateJob::WriteZeroes { ranges, unmap } => {
                updates.extend(ranges.iter().map(|&(offset, len)| Update::WriteZeroes {
                    offset,
                    len,
                    unmap: *unmap,
                }))
            }
            UpdateJob::Flush => updates.push(Update::Flush),
            UpdateJob::Discard { ranges } => updates.extend(
                ranges
                    .iter()
                    .map(|&(offset, len)| Update::Discard { offset, len }),
            ),
        }
        spans.push(start..updates.len());
    }
    let results = layer.update_batch(storage, &updates);
    let mut ok: Vec<bool> = Vec::with_capacity(batch.len());
    for span in &spans {
        let mut all = true;
        for result in results.get(span.clone()).unwrap_or_default() {
            if let Err(e) = result {
                log::warn!("{}", error_chain(e));
                if matches!(e, vublk_formats::UpdateError::Corrupt { .. }) {
                    on_corrupt(e.to_string());
                }
                all = false;
            }
        }
        ok.push(all && results.len() >= span.end);
    }
    drop(updates);
    for ((_, reply), ok) in batch.into_iter().zip(ok) {
        reply.send(ok);
    }
}

/// An error and its causes as one line (for logs and control-socket replies).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counting(ok_count: &Arc<AtomicUsize>, fail_count: &Arc<AtomicUsize>) -> Reply {
        let (ok_count, fail_count) = (Arc::clone(ok_count), Arc::clone(fail_count));
        Reply(Some(Box::new(move |ok| {
            if ok {
                ok_count.fetch_add(1, Ordering::SeqCst);
            } else {
                fail_count.fetch_add(1, Ordering::SeqCst);
            }
        })))
    }

    #[test]
    fn a_reply_is_sent_once_and_a_dropped_job_fails() {
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        counting(&ok, &failed).send(true);
        drop(counting(&ok, &failed));
        assert_eq!(ok.load(Ordering::SeqCst), 1);
        assert_eq!(failed.load(Ordering::SeqCst), 1, "the dropped one failed");
    }
}
