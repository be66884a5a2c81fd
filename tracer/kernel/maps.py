"""Write a compiled KernelPolicy (policy.py) into the probes' maps.

The maps are rewritten as a whole on start and on reload: new entries are written first and
stale ones deleted after, so a reload never opens a window in which a denied destination is
allowed. Anything the maps cannot hold raises EnforceError (a `block` is never silently
weakened).
"""
from __future__ import annotations

import ctypes as C
from dataclasses import dataclass, field

from agenttrace.kernel.mapwrite import delete_stale

from agenttrace.match.policy import (EXEC_MATCH_BASENAME, EXEC_MATCH_PATH, SCOPE_BITS, KernelPolicy)

SLOTS = 4                 # AT_DST_SLOTS in probes/net.c
MAX_PORT_EXPANSION = 4096  # port ranges narrower than "any" are expanded into per-port keys
COMM_LEN = 16
PATH_MAX = 256
FILE_POLICY_MAX = 64       # AT_FILE_POLICY_MAX in probes/files.c
NAME_ALLOW_MAX = 131072    # name_allow's size in probes/net.c (all groups together)


class EnforceError(Exception):
    """A policy the maps cannot hold; `policy_id` names the rule (KernelPolicy.policy_ids)."""

    def __init__(self, message: str, policy_id: int = 0):
        super().__init__(message)
        self.policy_id = policy_id


@dataclass
class NetPlan:
    """The connect-policy maps' contents as plain tuples: what `_net` writes, and what
    `check_fits` proves fits before anything is loaded."""
    scopes: list = field(default_factory=list)        # (family, addr16-ready bytes, prefixlen, scope)
    dst: dict = field(default_factory=dict)           # (gid, family, addr, prefixlen) -> slots
    ports: dict = field(default_factory=dict)         # (gid, port) -> slots


def _pad(family: int, addr: bytes) -> bytes:
    return addr.ljust(4 if family == 4 else 16, b"\0")


def plan_net(kp: KernelPolicy) -> NetPlan:
    """Bucket destination entries the way net.c looks them up; EnforceError when a bucket
    needs more than AT_DST_SLOTS slots or a port range would expand past the bound."""
    plan = NetPlan(scopes=[(e.family, _pad(e.family, e.addr), e.prefixlen, e.scope) for e in kp.scopes])

    def add_slot(bucket: list, e, deny, where):
        if len(bucket) >= SLOTS:
            raise EnforceError(f"more than {SLOTS} policy entries share {where}; "
                               "merge the rules' ports or split them by CIDR", e.policy_id)
        bucket.append((e.policy_id, e.port_lo, e.port_hi, e.proto, deny, e.scope_mask))

    for entries, deny in ((kp.dest_deny, 1), (kp.dest_allow, 0)):
        for e in entries:
            if e.prefixlen > 0 or e.addr:
                key = (e.group_id, e.family, _pad(e.family, e.addr), e.prefixlen)
                add_slot(plan.dst.setdefault(key, []), e, deny, f"group {e.group_id} prefix /{e.prefixlen}")
                continue
            if (e.port_lo, e.port_hi) in ((0, 65535), (1, 65535)):
                ports = [0]
            elif e.port_hi - e.port_lo + 1 <= MAX_PORT_EXPANSION:
                ports = range(e.port_lo, e.port_hi + 1)
            else:
                raise EnforceError(f"port range {e.port_lo}-{e.port_hi} is wider than "
                                   f"{MAX_PORT_EXPANSION} ports without a CIDR", e.policy_id)
            for port in ports:
                add_slot(plan.ports.setdefault((e.group_id, port), []), e, deny,
                         f"group {e.group_id} port {port or 'any'}")
    return plan


ALL_SCOPES = 0
for _bit in SCOPE_BITS.values():
    ALL_SCOPES |= _bit


def free_scopes(kp: KernelPolicy, plan: NetPlan) -> int:
    """The scopes no destination entry (CIDR, port, allow-list group) can match in any group:
    net.c allows a destination there without looking further (policy_free). A slot with no
    scope mask matches every scope, loopback included, so one such rule keeps every look-up."""
    used = 0
    for slots in list(plan.dst.values()) + list(plan.ports.values()):
        for _pid, _lo, _hi, _proto, _deny, mask in slots:
            used |= mask or ALL_SCOPES
    for g in kp.groups:
        if g.allow_list:
            used |= g.allow_scope_mask or ALL_SCOPES
    return ALL_SCOPES & ~used


def check_fits(kp: KernelPolicy) -> None:
    """Raise EnforceError for the first part of `kp` the probes' maps cannot hold. Pure: the
    same limits `PolicyWriter.apply` meets, checked without a kernel (rules lint, start and
    reload all call it through capability.check)."""
    plan_net(kp)
    if len(kp.name_allow) > NAME_ALLOW_MAX:
        # refused here, before anything loads: the map itself would refuse the first name
        # past its size (E2BIG) only after the others were written
        gid = kp.name_allow[NAME_ALLOW_MAX].group_id
        pid = next((g.policy_id for g in kp.groups if g.group_id == gid), 0)
        raise EnforceError(f"{len(kp.name_allow)} allowed names, more than the {NAME_ALLOW_MAX} the "
                           "kernel's name map holds; cover names with *.suffix wildcards", pid)
    for e in kp.exec_kill:
        if e.match == EXEC_MATCH_PATH and len(e.value) >= PATH_MAX:
            raise EnforceError(f"exec path longer than {PATH_MAX - 1} bytes", e.policy_id)
    keys: dict[int, int] = {}
    for e in kp.file_kill:
        keys.setdefault(e.key, e.policy_id)
    if len(keys) > FILE_POLICY_MAX:
        raise EnforceError(f"more than {FILE_POLICY_MAX} file kill entries", kp.file_kill[-1].policy_id)
    from agenttrace.kernel.sniwrite import SniPlanError, plan_sni
    try:
        plan_sni(kp.sni_deny)
    except SniPlanError as e:
        raise EnforceError(str(e), e.policy_id) from None
    from agenttrace.decode.protocols import FLOW_SLOTS
    per: dict[tuple, int] = {}
    for d in kp.protocol_drop:
        n = per[(d.group_id, d.protocol)] = per.get((d.group_id, d.protocol), 0) + 1
        if n > FLOW_SLOTS:
            raise EnforceError(f"more than {FLOW_SLOTS} protocol drops for one group and protocol; "
                               "merge their port ranges", d.policy_id)


def _mapped16(family: int, addr: bytes) -> bytes:
    addr = _pad(family, addr)
    if family == 4:
        return b"\0" * 10 + b"\xff\xff" + addr
    return addr


def _plen16(family: int, prefixlen: int) -> int:
    return prefixlen + 96 if family == 4 else prefixlen


class PolicyWriter:
    def __init__(self, probes):
        self.probes = probes
        self.policy: KernelPolicy | None = None

    def _has(self, name: str) -> bool:
        try:
            self.probes[name]
            return True
        except KeyError:
            return False

    def apply(self, kp: KernelPolicy, agent_groups: dict[int, str] | None = None) -> None:
        """Install kp; agent_groups maps agent cgroup id → group name (labels.group)."""
        if kp.sni_deny and self._has("flow_state") and not self._has("sni_deny"):
            # the flow probe runs but the server-name check was not loaded at start (a reload
            # brought the first such rule): these blocks would silently not be held
            raise EnforceError("rules block TLS server names but the tls probe was not loaded at "
                               "start; restart agenttrace to load it", kp.sni_deny[0].policy_id)
        if self._has("dst_policy"):
            self._net(kp)
        if self._has("kill_paths"):
            self._exec(kp)
        if self._has("file_policy"):
            self._files(kp)
        if self._has("flow_policy"):
            from agenttrace.decode.protocols import FlowPolicyError, write_flow_policy
            try:
                write_flow_policy(self.probes["flow_policy"], kp.protocol_drop)
            except FlowPolicyError as e:
                raise EnforceError(str(e)) from None
        if self._has("sni_deny"):
            from agenttrace.kernel.sniwrite import write_sni_deny
            write_sni_deny(self.probes["sni_deny"], kp.sni_deny)
        self.policy = kp
        if agent_groups:
            for cid, name in agent_groups.items():
                self.assign(cid, name)

    def assign(self, agent_cgroup_id: int, group: str | None) -> None:
        """Tell the kernel which egress group an agent belongs to."""
        if self.policy is None or not self._has("agent_group"):
            return
        gid = self.policy.group_ids.get(group or "default", 0)
        t = self.probes["agent_group"]
        k = t.Key(agent_cgroup_id)
        if gid:
            t[k] = t.Leaf(gid)
        else:
            try:
                del t[k]
            except KeyError:
                pass

    # --- network ---------------------------------------------------------------------
    def _net(self, kp: KernelPolicy) -> None:
        p = self.probes
        plan = plan_net(kp)
        scopes = p["scopes"]
        want_scopes = {}
        for fam, addr, plen, scope in plan.scopes:
            k = scopes.Key()
            k.prefixlen = _plen16(fam, plen)
            C.memmove(C.addressof(k) + 4, _mapped16(fam, addr), 16)
            want_scopes[bytes(k)] = (k, scope)
        dst = {}
        for (gid, fam, addr, plen), slots in plan.dst.items():
            k = p["dst_policy"].Key()
            k.prefixlen = 32 + _plen16(fam, plen)
            C.memmove(C.addressof(k) + 4, gid.to_bytes(4, "little"), 4)
            C.memmove(C.addressof(k) + 8, _mapped16(fam, addr), 16)
            dst[bytes(k)] = (k, slots)

        # the skip in net.c narrows first (old and new entries may both be in the maps until
        # the stale ones are gone), and takes the new rules' extent only once they are alone
        free = free_scopes(kp, plan)
        has_free = self._has("policy_free")
        if has_free:
            old_free = p["policy_free"][p["policy_free"].Key(0)].value
            p.set_flag("policy_free", 0, old_free & free)
        # write new, then delete stale
        for key, (k, sc) in want_scopes.items():
            scopes[k] = scopes.Leaf(sc)
        self._delete_stale(scopes, set(want_scopes))
        t = p["dst_policy"]
        for key, (k, slots) in dst.items():
            t[k] = self._slots(t.Leaf(), slots)
        self._delete_stale(t, set(dst))
        t = p["scope_policy"]
        want = set()
        for (gid, port), slots in plan.ports.items():
            k = t.Key(gid, port)
            t[k] = self._slots(t.Leaf(), slots)
            want.add(bytes(k))
        self._delete_stale(t, want)
        t = p["group_allow"]
        want = set()
        for g in kp.groups:
            if g.allow_list:
                k = t.Key(g.group_id)
                t[k] = t.Leaf(g.allow_scope_mask, g.policy_id, g.ttl_min, g.ttl_max)
                want.add(bytes(k))
        self._delete_stale(t, want)
        if has_free:
            p.set_flag("policy_free", 0, free)
        from agenttrace.kernel.wire import CFG_DEFAULT_GROUP
        p.set_flag("at_config", CFG_DEFAULT_GROUP, kp.group_ids.get("default", 0))
        if self._has("name_allow"):
            from agenttrace.kernel.egress import write_name_allow
            write_name_allow(p["name_allow"], kp.name_allow)

    @staticmethod
    def _slots(leaf, slots):
        for i, (pid, lo, hi, proto, deny, mask) in enumerate(slots):
            s = leaf.s[i]
            s.policy_id, s.port_lo, s.port_hi, s.proto, s.deny, s.scope_mask = pid, lo, hi, proto, deny, mask
        return leaf

    @staticmethod
    def _delete_stale(table, keep: set[bytes]) -> None:
        delete_stale(table, keep)

    # --- exec ------------------------------------------------------------------------
    def _exec(self, kp: KernelPolicy) -> None:
        paths, names = self.probes["kill_paths"], self.probes["kill_names"]
        want_p, want_n = set(), set()
        # kill_paths_on (probes/proc.c): on before the first path goes in, off only once the
        # last is out, so no path is ever in the map unasked
        any_path = any(e.match == EXEC_MATCH_PATH for e in kp.exec_kill)
        if any_path:
            self._kill_paths_on(1)
        for e in kp.exec_kill:
            if e.match == EXEC_MATCH_PATH:
                if len(e.value) >= PATH_MAX:
                    raise EnforceError(f"policy {e.policy_id}: exec path longer than {PATH_MAX - 1} bytes")
                k = paths.Key()
                C.memmove(C.addressof(k), e.value, len(e.value))
                paths[k] = paths.Leaf(e.policy_id)
                want_p.add(bytes(k))
            elif e.match == EXEC_MATCH_BASENAME:
                # the kernel compares against comm, which holds the first 15 bytes of the
                # basename: longer names match on that prefix
                v = e.value[:COMM_LEN - 1]
                k = names.Key()
                C.memmove(C.addressof(k), v, len(v))
                names[k] = names.Leaf(e.policy_id)
                want_n.add(bytes(k))
        self._delete_stale(paths, want_p)
        self._delete_stale(names, want_n)
        if not any_path:
            self._kill_paths_on(0)

    def _kill_paths_on(self, on: int) -> None:
        if self._has("kill_paths_on"):
            t = self.probes["kill_paths_on"]
            t[t.Key(0)] = t.Leaf(on)

    # --- files -----------------------------------------------------------------------
    def _files(self, kp: KernelPolicy) -> None:
        t = self.probes["file_policy"]
        want: dict[int, int] = {}
        for e in kp.file_kill:
            # two rules on the same class/op: the first (lowest policy id) is reported
            want.setdefault(e.key, e.policy_id)
        if len(want) > FILE_POLICY_MAX:
            raise EnforceError(f"more than {FILE_POLICY_MAX} file kill entries")
        keep = set()
        for key, pid in want.items():
            k = t.Key(key)
            t[k] = t.Leaf(pid)
            keep.add(bytes(k))
        self._delete_stale(t, keep)
