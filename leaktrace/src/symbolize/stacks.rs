//! The stack store: stack id → the process and frames behind it, each frame already placed
//! in its module (file + offset) while the process was alive, so it can be symbolized after
//! the process is gone.
use std::sync::Arc;

use hashbrown::HashMap;
use leaktrace_common::stack_flags;

use crate::{
    targets::modules::{AddressSpace, Module},
    track::StackId,
};

/// A raw frame placed in its module (normalized), not yet symbolized.
#[derive(Clone, Debug)]
pub struct PlacedFrame {
    /// The address in the process.
    pub addr: u64,
    /// The module and the file offset of the address to look up (for return addresses, the
    /// call instruction: the address minus one). `None` outside any file mapping.
    pub place: Option<(Arc<Module>, u64)>,
    /// For code outside any file: the mapping's name (`[vdso]`, or empty for anonymous code).
    pub mapping: Option<String>,
}

/// A stack as received from the kernel side.
#[derive(Clone, Debug)]
pub struct Stack {
    /// The process it was captured in.
    pub pid: u32,
    /// Bits of [`stack_flags`].
    pub flags: u32,
    /// Innermost first.
    pub frames: Box<[PlacedFrame]>,
}

impl Stack {
    /// The walk hit its depth limit.
    pub fn truncated(&self) -> bool {
        self.flags & stack_flags::TRUNCATED != 0
    }

    /// The walk broke off early (no unwind information, unreadable memory, a garbage address).
    pub fn broken(&self) -> bool {
        self.flags & stack_flags::BROKEN != 0
    }
}

/// Places raw frames in the process's modules. The stack ends at the first frame outside
/// all executable mappings: a walk that read garbage there (flagged [`stack_flags::BROKEN`]).
pub fn normalize(
    space: &AddressSpace,
    flags: &mut u32,
    frames: impl Iterator<Item = u64>,
) -> Box<[PlacedFrame]> {
    let mut out = Vec::new();
    for (i, addr) in frames.enumerate() {
        // A return address points after the call; look up the call itself.
        let lookup = if i == 0 && *flags & stack_flags::FIRST_IS_PC != 0 {
            addr
        } else {
            addr.saturating_sub(1)
        };
        let Some(range) = space.range(lookup) else {
            *flags |= stack_flags::BROKEN;
            break;
        };
        let place = range
            .module
            .as_ref()
            .map(|m| (m.clone(), lookup - range.start + range.offset));
        let mapping = range.module.is_none().then(|| range.name.clone());
        out.push(PlacedFrame {
            addr,
            place,
            mapping,
        });
    }
    out.into_boxed_slice()
}

/// All stacks seen, by id.
#[derive(Debug)]
pub struct StackStore {
    stacks: HashMap<StackId, Stack>,
    /// The stacks of each process, to forget them without a scan of all.
    by_pid: HashMap<u32, Vec<StackId>>,
    /// At most this many stacks are kept; more are dropped and counted.
    cap: usize,
    dropped: u64,
}

impl Default for StackStore {
    fn default() -> Self {
        Self::with_cap(Self::DEFAULT_CAP)
    }
}

impl StackStore {
    /// Stacks kept by default (a few hundred MiB at most).
    pub const DEFAULT_CAP: usize = 1 << 21;

    /// A store of at most `cap` stacks.
    pub fn with_cap(cap: usize) -> Self {
        Self {
            stacks: HashMap::new(),
            by_pid: HashMap::new(),
            cap,
            dropped: 0,
        }
    }

    /// Stacks not stored because the store was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Whether the stack is known.
    pub fn contains(&self, id: StackId) -> bool {
        self.stacks.contains_key(&id)
    }

    /// Stores a stack under its id, unless the store is full (then it is counted).
    pub fn insert(&mut self, id: StackId, stack: Stack) {
        if self.stacks.len() >= self.cap && !self.stacks.contains_key(&id) {
            self.dropped += 1;
            return;
        }
        self.by_pid.entry(stack.pid).or_default().push(id);
        self.stacks.insert(id, stack);
    }

    /// The stack with this id, if known.
    pub fn get(&self, id: StackId) -> Option<&Stack> {
        self.stacks.get(&id)
    }

    /// How many stacks are stored.
    pub fn len(&self) -> usize {
        self.stacks.len()
    }

    /// How many stacks satisfy `pred`.
    pub fn count(&self, pred: impl Fn(&Stack) -> bool) -> u64 {
        self.stacks.values().filter(|s| pred(s)).count() as u64
    }

    /// True when no stack is stored.
    pub fn is_empty(&self) -> bool {
        self.stacks.is_empty()
    }

    /// Forgets the stacks of a process no report needs any more.
    pub fn forget_pid(&mut self, pid: u32, keep: impl Fn(StackId) -> bool) {
        let Some(ids) = self.by_pid.remove(&pid) else {
            return;
        };
        let kept: Vec<StackId> = ids
            .into_iter()
            .filter(|&id| {
                let k = keep(id);
                if !k {
                    self.stacks.remove(&id);
                }
                k
            })
            .collect();
        if !kept.is_empty() {
            self.by_pid.insert(pid, kept);
        }
    }
}
