//! Types shared by the eBPF programs and the control plane: one `#[repr(C)]` layout each.
//!
//! Both sides compile this file, so a layout change cannot drift between them. Every struct
//! spells out its padding and carries a `const` size assertion; `bytemuck::Pod` and
//! `aya::Pod` (needed to read and write the structs through aya maps) sit behind the `user`
//! feature so the eBPF crate never pulls in aya or bytemuck.
#![no_std]

/// Name of the sockhash that holds redirect *targets* (no program attached), keyed by socket
/// cookie. A socket must be here before its peer's verdict can redirect to it.
pub const MAP_TARGETS: &str = "TARGETS";
/// Name of the sockhash with the stream verdict attached, keyed by socket cookie. Inserting a
/// socket here makes the verdict see every skb it receives.
pub const MAP_SOCKETS: &str = "SOCKETS";
/// Name of the hash map `source socket cookie -> Flow`.
pub const MAP_FLOWS: &str = "FLOWS";
/// Name of the hash map `source socket cookie -> Control`.
pub const MAP_CONTROL: &str = "CONTROL";
/// Name of the ring buffer carrying [`SocketEvent`]s.
pub const MAP_EVENTS: &str = "EVENTS";
/// Name of the per-CPU array (one slot, index 0) counting events the ring buffer had no room for.
pub const MAP_EVENTS_LOST: &str = "EVENTS_LOST";
/// Name of the sk_skb stream verdict program.
pub const PROG_REDIRECT: &str = "redirect";
/// Name of the sock_ops program reporting TCP state changes of the sockets armed at splice
/// time ([`ARM_EVENTS_OPTION`]).
pub const PROG_STATE_EVENTS: &str = "state_events";
/// Name of the sock_ops program that arms every established socket itself, for kernels
/// where [`PROG_ARM_EVENTS`] cannot (before Linux 6.12), and where every route splices
/// each connection at once (arming at splice would only add two system calls).
pub const PROG_STATE_EVENTS_ALL: &str = "state_events_all";
/// Name of the cgroup setsockopt program that arms a socket's sock_ops callbacks when
/// userspace asks with [`ARM_EVENTS_OPTION`].
pub const PROG_ARM_EVENTS: &str = "arm_events";
/// `setsockopt(fd, IPPROTO_TCP, ARM_EVENTS_OPTION, &1, 4)` on a socket of the proxy's
/// cgroup: [`PROG_ARM_EVENTS`] turns on the state-change and RTT callbacks of its sock_ops
/// programs for that socket and answers 0. The value is the kernel's
/// `TCP_BPF_SOCK_OPS_CB_FLAGS`, which only BPF programs may set (Linux 6.12); the kernel
/// itself answers ENOPROTOOPT, so a socket left unarmed is never mistaken for an armed one.
pub const ARM_EVENTS_OPTION: i32 = 1008;

/// Version of everything the eBPF programs and the control plane share through the maps:
/// the structs below, the map names, types, key and value sizes and what their fields
/// mean. Bump it with every change to any of them. A successor process reuses its
/// predecessor's pinned maps only at the same version (the pin directory carries it, see
/// `smartproxy/src/datapath/kernel/pins.rs`), and the upgrade handoff stamp carries it too.
pub const LAYOUT_VERSION: u32 = 2;

/// Default size of `EVENTS`, in bytes (a power of two, as the kernel requires).
pub const DEFAULT_RING_BUFFER_BYTES: u32 = 256 * 1024;
/// Capacity of `FLOWS`, `CONTROL`, `TARGETS` and `SOCKETS` as the eBPF object declares it
/// (entries, two per spliced connection). The proxy sets its own at load, from
/// `proxy.ebpf_max_connections`.
pub const DEFAULT_MAX_SOCKETS: u32 = 2 * 65_536;

/// One direction of a spliced connection, keyed in `FLOWS` by the cookie of the socket the
/// bytes are *read from*.
///
/// Userspace writes the whole value once, when the splice is created, and never again (a
/// userspace update replaces the whole value and would lose the kernel's counts). After
/// that, `redirected`, `passed` and `last_activity_ns` are written only by
/// the stream verdict of the source socket, which the kernel runs serialized per socket,
/// and `acked` only by the sock_ops program of the same socket; plain (non-atomic) stores
/// are therefore safe (`docs/kernel-notes.md#counters-without-atomics`: `fetch_add` does not exist on bpfel).
///
/// Backpressure: the verdict redirects while the bytes on their way to the peer
/// (`redirected + Control::flushed - what the peer's receiver acknowledged`) stay under
/// `Control::cap`. That is the kernel's redirect backlog plus the peer socket's send
/// queue, whose size userspace pins above the cap (see
/// `smartproxy/src/datapath/kernel/sys.rs` `pin_buffers`). At the cap it passes
/// instead: the bytes stay in the source socket, charged to it, so its window closes, and
/// userspace forwards them. It keeps passing until userspace has written every passed
/// byte to the peer (`passed == Control::flushed`): only then can a redirected byte not
/// overtake one that userspace still holds. The first `pass_first` bytes are passed too.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Flow {
    /// Cookie of the socket the verdict redirects this socket's bytes to.
    pub peer_cookie: u64,
    /// Bytes the verdict redirected to the peer (only counted when the redirect succeeded).
    pub redirected: u64,
    /// Bytes the verdict passed up to userspace (a cap reached, or a failed redirect).
    pub passed: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last non-empty skb seen; 0 = none yet.
    pub last_activity_ns: u64,
    /// This socket's `tcpi_bytes_acked`, as of its latest ACK (sock_ops RTT callback).
    pub acked: u64,
    /// `tcpi_bytes_acked + SIOCOUTQ` of this socket at splice time: what `acked` reaches
    /// once everything written before the splice is acknowledged.
    pub acked_base: u64,
    /// The TCP sequence number of the next byte the verdict has not seen yet; valid once
    /// `seq_known` is non-zero (from the first skb on). Written by the verdict only.
    pub next_seq: u32,
    pub seq_known: u32,
    /// Bytes the socket had received before the splice and nobody had read (`SIOCINQ`):
    /// the verdict passes at least that many, so that userspace's `recv` announces the
    /// window they held. Redirected, they left without a window update reaching a client
    /// whose window had filled before the backend answered (seen with tcpdump), and that
    /// client waited for its persist timer (200 ms).
    pub pass_first: u64,
}

const _: () = assert!(core::mem::size_of::<Flow>() == 64);

/// Userspace's half of the switch between redirect and pass for one direction, keyed in
/// `CONTROL` by the source socket's cookie. Written only by userspace, read only by the
/// verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Control {
    /// Bytes userspace read from the source socket and wrote to the peer.
    pub flushed: u64,
    /// `max_queued_bytes`: the most bytes that may be on their way to the peer.
    pub cap: u64,
    /// Non-zero: the verdict may redirect. Zero: it passes every byte to userspace. A splice
    /// starts passing and redirects only once both sockets are in `SOCKETS`, so that a
    /// socket the kernel refuses half way (its FIN arrived) leaves nothing redirected; it
    /// goes back to passing before userspace shuts the destination on its own authority.
    pub redirect: u64,
}

const _: () = assert!(core::mem::size_of::<Control>() == 24);

/// What happened to a spliced socket, sent through `EVENTS`: a TCP state change, from the
/// sock_ops program, or bytes the verdict passed up while redirecting
/// ([`SocketEvent::BYTES_PASSED`] in both states). States are the kernel's `TCP_*`
/// numbers (`TCP_ESTABLISHED` = 1, `TCP_CLOSE` = 7, `TCP_CLOSE_WAIT` = 8, ...).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SocketEvent {
    /// Cookie of the socket whose state changed.
    pub cookie: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the change happened.
    pub timestamp_ns: u64,
    /// State before the change.
    pub old_state: u32,
    /// State after the change.
    pub new_state: u32,
}

impl SocketEvent {
    /// `old_state` and `new_state` of an event from the verdict: while the socket's
    /// direction redirects, it passed bytes up to userspace, which does not watch a
    /// redirecting socket for reads (no TCP state is 0).
    pub const BYTES_PASSED: u32 = 0;
}

const _: () = assert!(core::mem::size_of::<SocketEvent>() == 24);

// SAFETY: both types are `#[repr(C)]`, made only of integers, and have no padding (the size
// assertions above pin that), so every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Flow {}
// SAFETY: as for `Flow` above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SocketEvent {}
// SAFETY: as for `Flow` above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Control {}
