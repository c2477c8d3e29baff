//! smartproxy's kernel data path: an sk_skb stream verdict that redirects each spliced
//! socket's bytes to its peer, and a sock_ops program that reports TCP state changes of
//! spliced sockets through a ring buffer, where the verdict also reports bytes it passes up
//! while redirecting. A cgroup setsockopt program arms the sock_ops callbacks of a socket
//! when it is spliced, so that sockets which never are run no program per ACK or state
//! change. See `docs/kernel-notes.md` for the kernel behaviour behind each rule.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_NET,
        sk_action::{SK_DROP, SK_PASS},
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::{bpf_get_socket_cookie, bpf_getsockopt, bpf_ktime_get_ns, bpf_setsockopt},
    macros::{cgroup_sockopt, map, sock_ops, stream_verdict},
    maps::{HashMap, PerCpuArray, RingBuf, SockHash},
    programs::{SkBuffContext, SockOpsContext, SockoptContext},
    EbpfContext as _,
};
use smartproxy_common::{
    Control, Flow, SocketEvent, ARM_EVENTS_OPTION, DEFAULT_MAX_SOCKETS, DEFAULT_RING_BUFFER_BYTES,
};

/// Redirect targets, keyed by socket cookie. No program is attached: being here only makes a
/// socket reachable by `bpf_sk_redirect_hash`. Userspace inserts both sockets of a pair here
/// before either enters `SOCKETS`.
#[map]
static TARGETS: SockHash<u64> = SockHash::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

/// Sockets whose received bytes go through `redirect`, keyed by socket cookie.
#[map]
static SOCKETS: SockHash<u64> = SockHash::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

/// Source socket cookie -> where its bytes go and what the verdict counted.
#[map]
static FLOWS: HashMap<u64, Flow> = HashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

/// Source socket cookie -> userspace's half of the backpressure switch.
#[map]
static CONTROL: HashMap<u64, Control> = HashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);

/// TCP state changes of sockets that have a `FLOWS` entry, and bytes the verdict passed up
/// while redirecting.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BUFFER_BYTES, 0);

/// Slot 0 counts events dropped because `EVENTS` was full. Per CPU because sock_ops runs on
/// several CPUs at once and bpfel has no atomic add
/// (`docs/kernel-notes.md#counters-without-atomics`); userspace sums the slots.
#[map]
static EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[stream_verdict]
pub fn redirect(ctx: SkBuffContext) -> u32 {
    try_redirect(&ctx)
}

/// Every skb that carries bytes gets `SK_PASS`: either the value of a successful
/// `bpf_sk_redirect_hash` (which makes the kernel redirect) or a plain pass to the
/// socket's own receive queue, where userspace reads it. Such an skb is never dropped: for
/// TCP that silently loses bytes the kernel already ACKed.
#[inline(always)]
fn try_redirect(ctx: &SkBuffContext) -> u32 {
    let len = u64::from(ctx.len());
    // A FIN arrives as a zero-length skb, and TCP has already taken it (the socket is shut
    // for reading, which is how userspace sees EOF). Redirecting it sets EPIPE on the peer
    // (`docs/kernel-notes.md#fin-skb`). Passing it is no better: while the kernel's redirect backlog toward
    // this socket is not empty, a passed skb is queued behind it, and the backlog worker
    // takes the zero length for a failed send: EPIPE on this socket, its send path off.
    // Dropped, it carries no byte to lose.
    if len == 0 {
        return SK_DROP;
    }
    // SAFETY: the helper only reads the socket behind the verdict's own context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(flow) = FLOWS.get_ptr_mut(cookie) else {
        return SK_PASS;
    };
    // SAFETY: the value is copied out; userspace writes CONTROL entries whole.
    let Some(control) = (unsafe { CONTROL.get(cookie) }).copied() else {
        return SK_PASS;
    };
    // SAFETY: `flow` points at a live FLOWS value (the lookup succeeded and the map entry
    // outlives this program run); only this socket's verdict writes these fields, and the
    // kernel runs it serialized per socket.
    let flow = unsafe { &mut *flow };
    flow.last_activity_ns = unsafe { bpf_ktime_get_ns() };
    let len = skip_seen_bytes(ctx, flow, len);
    // Pass while userspace asks for it (`Control::redirect`), the bytes that were queued
    // before the splice (see `Flow::pass_first`), while userspace holds passed bytes it
    // has not written yet (a redirected byte would overtake them), and while the peer has
    // `cap` bytes on their way.
    if control.redirect == 0 {
        flow.passed += len;
        return SK_PASS;
    }
    // While redirecting, userspace does not watch the socket for reads: each pass is
    // reported. If the peer is not (or no longer) a target the redirect fails with
    // SK_DROP; pass instead so userspace receives the bytes rather than losing them.
    if flow.passed < flow.pass_first
        || flow.passed != control.flushed
        || over_cap(flow, &control)
        || TARGETS.redirect_skb(ctx, flow.peer_cookie, 0) != i64::from(SK_PASS)
    {
        flow.passed += len;
        report(SocketEvent {
            cookie,
            // This skb's arrival, read above.
            timestamp_ns: flow.last_activity_ns,
            old_state: SocketEvent::BYTES_PASSED,
            new_state: SocketEvent::BYTES_PASSED,
        });
        return SK_PASS;
    }
    flow.redirected += len;
    SK_PASS
}

/// Trims from the front of the skb the bytes this verdict already saw, and returns its
/// length after that. On this kernel (6.18) a retransmitted segment that overlaps bytes
/// already received (after a lost ACK, or when the receive queue was pruned under memory
/// pressure) is queued whole, and `tcp_read_skb` hands it whole to the verdict: without
/// this, the overlap reaches the peer twice. The skb's TCP sequence numbers are the first
/// two words of its control block, which `__sk_buff.cb` exposes to sk_skb programs; an
/// skb whose numbers do not match its length is left alone.
#[inline(always)]
fn skip_seen_bytes(ctx: &SkBuffContext, flow: &mut Flow, len: u64) -> u64 {
    let cb = ctx.skb.cb();
    let (seq, end_seq) = (cb[0], cb[1]);
    let span = u64::from(end_seq.wrapping_sub(seq));
    // end_seq counts a FIN too.
    if span != len && span != len + 1 {
        return len;
    }
    if flow.seq_known == 0 {
        flow.seq_known = 1;
        flow.next_seq = seq.wrapping_add(len as u32);
        return len;
    }
    // Signed distance: positive when the skb starts before the next unseen byte.
    let overlap = flow.next_seq.wrapping_sub(seq) as i32;
    if overlap <= 0 {
        // New bytes only.
        flow.next_seq = seq.wrapping_add(len as u32);
        return len;
    }
    if u64::from(overlap as u32) >= len {
        // Nothing new at all, which TCP never queues: left alone, and `next_seq` never
        // moves back.
        return len;
    }
    let mut left = overlap as u32;
    for _ in 0..MAX_TRIM_CALLS {
        if left == 0 {
            break;
        }
        let step = left.min(MAX_ADJUST_ROOM);
        if ctx
            .skb
            .adjust_room(-(step as i32), BPF_ADJ_ROOM_NET, 0)
            .is_err()
        {
            break;
        }
        left -= step;
    }
    let trimmed = overlap as u32 - left;
    flow.next_seq = seq.wrapping_add(len as u32);
    len - u64::from(trimmed)
}

/// The most `bpf_skb_adjust_room` removes from an sk_skb in one call.
const MAX_ADJUST_ROOM: u32 = 0xfff;

/// Calls of `bpf_skb_adjust_room` one trim may make: 4,193,280 bytes, more than one skb
/// holds (TCP coalesces at most `MAX_SKB_FRAGS` page fragments of at most 32 KiB each
/// into one: 1.4 MiB with 45 fragments, the kernel's largest setting). Overlaps of 197 KiB
/// were seen in pass mode on loopback (`bpf_printk`); with 64 calls (262,080 bytes) one
/// run delivered 64 bytes twice, an overlap of exactly 256 KiB
/// (`docs/kernel-notes.md#retransmitted-skbs`).
const MAX_TRIM_CALLS: u32 = 1024;

/// Whether the bytes on their way to the peer (redirected or forwarded by userspace, not
/// yet acknowledged by the peer's receiver) reached the cap. They include the peer
/// socket's whole send queue, which is pinned larger than the cap: the kernel's redirect
/// backlog then never meets a full send queue in the middle of an skb, where this kernel
/// fails the socket (lost bytes).
#[inline(always)]
fn over_cap(flow: &Flow, control: &Control) -> bool {
    // SAFETY: the value is copied out; its `acked` is written by the peer's sock_ops
    // program, one aligned u64 store, so a concurrent read sees the old or the new value.
    let Some(peer) = (unsafe { FLOWS.get(flow.peer_cookie) }).copied() else {
        return false;
    };
    let taken = peer.acked.saturating_sub(peer.acked_base);
    let on_the_way = (flow.redirected + control.flushed).saturating_sub(taken);
    on_the_way >= control.cap
}

/// The callbacks both sock_ops programs need on a spliced socket: its state changes (FIN,
/// RST) and its acknowledged bytes (`over_cap`).
const EVENT_FLAGS: u32 = BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG;

/// `IPPROTO_TCP`, the level of [`ARM_EVENTS_OPTION`].
const SOL_TCP: i32 = 6;

/// The sock_ops program where the cgroup setsockopt program can arm sockets
/// ([`arm_events`]): only sockets userspace armed at splice time run it after their
/// handshake. Every other socket of the cgroup runs it only for the callbacks the kernel
/// makes at every handshake, never per ACK or state change (`docs/performance.md`,
/// "Callbacks armed at splice time").
#[sock_ops]
pub fn state_events(ctx: SockOpsContext) -> u32 {
    report_state(&ctx);
    // sock_ops programs report success with 1; any other value makes some callers return
    // -EPERM.
    1
}

/// The sock_ops program for kernels where [`arm_events`] cannot arm a socket (before
/// 6.12), and for a proxy whose every connection splices at once: every established
/// socket of the cgroup asks for the callbacks at its handshake.
#[sock_ops]
pub fn state_events_all(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            // Keep flags another program may have set. The kernel refuses only flags it
            // does not know, and it knows both wherever the programs attach with bpf_links
            // (5.7 on). A refusal would leave the socket without events, its FIN and RST
            // seen only by a check made for another reason.
            let _ = ctx.set_cb_flags((ctx.cb_flags() | EVENT_FLAGS) as i32);
        }
        _ => report_state(&ctx),
    }
    1
}

/// `setsockopt(fd, IPPROTO_TCP, ARM_EVENTS_OPTION, ..)` from a process of the cgroup: turns
/// on [`EVENT_FLAGS`] for that socket, keeping any other flag, and answers 0 without the
/// kernel's own handler (which knows no such option). A failure answers EPERM. Every
/// other socket option passes through untouched.
#[cgroup_sockopt(setsockopt)]
pub fn arm_events(ctx: SockoptContext) -> i32 {
    // SAFETY: `ctx.sockopt` is the program's context, valid for this run.
    let sockopt = unsafe { &mut *ctx.sockopt };
    if sockopt.level != SOL_TCP || sockopt.optname != ARM_EVENTS_OPTION {
        return 1;
    }
    // SAFETY: the context's socket, which the kernel holds locked for this run.
    let sk = unsafe { sockopt.__bindgen_anon_1.sk }.cast();
    let size = core::mem::size_of::<i32>() as i32;
    let mut flags: i32 = 0;
    // SAFETY: the helper writes at most the 4 bytes of `flags`, on this program's stack.
    let read = unsafe {
        bpf_getsockopt(
            sk,
            SOL_TCP,
            ARM_EVENTS_OPTION,
            core::ptr::addr_of_mut!(flags).cast(),
            size,
        )
    };
    let mut armed_flags = flags | EVENT_FLAGS as i32;
    // SAFETY: the helper reads the 4 bytes of `armed_flags`, on this program's stack.
    let armed = read == 0
        && unsafe {
            bpf_setsockopt(
                sk,
                SOL_TCP,
                ARM_EVENTS_OPTION,
                core::ptr::addr_of_mut!(armed_flags).cast(),
                size,
            )
        } == 0;
    if !armed {
        return 0;
    }
    // -1: done here, the kernel's handler is skipped and setsockopt returns 0.
    sockopt.optlen = -1;
    1
}

/// Acknowledged bytes and state changes of an armed socket: only spliced sockets (those
/// with a `FLOWS` entry) get anything done.
#[inline(always)]
fn report_state(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_RTT_CB => {
            // SAFETY: the helper only reads the socket behind the program's context pointer.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            if let Some(flow) = FLOWS.get_ptr_mut(cookie) {
                // SAFETY: `ctx.ops` is the program's context; `flow` is a live FLOWS value
                // whose `acked` is written only here, for this socket, and read by its
                // peer's verdict (see `over_cap`).
                unsafe { (*flow).acked = (*ctx.ops).bytes_acked };
            }
        }
        BPF_SOCK_OPS_STATE_CB => {
            // SAFETY: the helper only reads the socket behind the program's context pointer.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            // Sockets that are not spliced cost this one lookup and nothing else.
            // SAFETY: the value is only tested for presence, never read.
            if unsafe { FLOWS.get(cookie) }.is_none() {
                return;
            }
            let event = SocketEvent {
                cookie,
                // SAFETY: reads the monotonic clock; no memory is touched.
                timestamp_ns: unsafe { bpf_ktime_get_ns() },
                // STATE_CB: args[0] = old state, args[1] = new state.
                old_state: ctx.arg(0),
                new_state: ctx.arg(1),
            };
            report(event);
        }
        _ => {}
    }
}

/// Writes `event` to `EVENTS`, or counts it lost when the ring is full (userspace then
/// re-checks every spliced socket).
#[inline(always)]
fn report(event: SocketEvent) {
    match EVENTS.reserve::<SocketEvent>(0) {
        Some(mut entry) => {
            entry.write(event);
            entry.submit(0);
        }
        None => {
            if let Some(lost) = EVENTS_LOST.get_ptr_mut(0) {
                // SAFETY: slot 0 of this CPU's copy, valid for the program run. A run
                // preempted on the same CPU by another run could lose an increment; the
                // count only has to grow for userspace to re-check.
                unsafe { *lost += 1 };
            }
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The kernel reads the license from this section. None of the helpers called here is
/// `gpl_only` (not `bpf_sk_redirect_hash`, not `bpf_ringbuf_reserve`); a GPL-compatible
/// string is only needed if a GPL-only helper (perf-event output, say) is ever called.
/// See `docs/kernel-notes.md#gpl-only-helpers` and `LICENSE.md`.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
