"""What the kernel can hold: one answer for `rules lint`, session start and reload.

A rule set passes when every rule loads (rules.load_rules: schema, CEL, which actions the
kernel can enforce at all) AND its compiled KernelPolicy fits the probes' maps (slot and size
limits, enforce.check_fits). Three places used to decide this separately and disagreed: a
rule set could lint clean and then fail at start with a traceback, or fail only on SIGHUP.
Now a rule set that lints clean always starts and always reloads, and one that cannot be held
is an error naming the rule, file and line.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

from agenttrace.match.rules import RuleError, RuleSet, RulesError, load_rules


class CapabilityError(Exception):
    def __init__(self, errors: List[RuleError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


def check(ruleset: RuleSet, internal: Iterable[str] = ()):
    """The KernelPolicy of `ruleset`, proven to fit; CapabilityError naming the rule if not."""
    from agenttrace.kernel.maps import EnforceError, check_fits
    from agenttrace.enrich.scope import DEFAULT_INTERNAL
    from agenttrace.match.policy import PolicyError, compile_policy
    internal = list(DEFAULT_INTERNAL) + list(internal)
    # a session checks at load (before any probe) and again when it installs the policy: the
    # same ruleset compiles to the same policy (a 100,000-name allow-list takes ~0.9 s), so the
    # second check takes the first one's result, and drops it: the policy is not kept for the
    # session's life (it is in the kernel maps by then)
    cached = ruleset.__dict__.pop("_kernel_policy", None)
    if cached is not None and cached[0] == internal:
        return cached[1]
    by_id = {r.id: r for r in ruleset.rules}
    try:
        kp = compile_policy(ruleset, internal=internal)
    except PolicyError as e:
        rid = str(e).split(":", 1)[0].removeprefix("rule ").strip()
        raise CapabilityError([_error(by_id.get(rid), str(e), ruleset)]) from None
    try:
        check_fits(kp)
    except EnforceError as e:
        rid = kp.policy_ids.get(e.policy_id)
        raise CapabilityError([_error(by_id.get(rid), f"the kernel cannot hold this rule: {e}", ruleset)]) from None
    ruleset._kernel_policy = (internal, kp)
    return kp


def _error(rule, message: str, ruleset: RuleSet) -> RuleError:
    if rule is None:
        f = ruleset.files[0] if ruleset.files else "<rules>"
        return RuleError(str(f), 0, 0, "", message)
    return RuleError(rule.file, rule.line, 1, "", message, rule.id)


def lint(paths, egress: Optional[dict] = None, internal: Iterable[str] = ()) -> List[RuleError]:
    """Every problem `rules lint` reports: load errors, else what the kernel cannot hold."""
    try:
        rs = load_rules(paths, egress)
    except RulesError as e:
        return e.errors
    try:
        check(rs, internal)
    except CapabilityError as e:
        return e.errors
    return []
