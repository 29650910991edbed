#!/usr/bin/env python3
"""The shipped Prometheus alert rules (issue 16): contrib/prometheus/tdrain.rules.yml passes
"promtool check rules" and the scenarios of tests/prometheus/tdrain.rules.test.yml
("promtool test rules": the alerts fire on the situations docs/OPERATIONS.md section 5 describes and
stay quiet on a healthy deployment), and every rule quoted in docs/OPERATIONS.md is in the file with the
same expression.  No server is started.  Outside CI a missing promtool (Debian package prometheus)
skips the test; under CI=true it is a failure.
"""
import os
import re
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import harness  # noqa: E402


def alerts(text):
    """{alert name: expression} of YAML rule text (the one-line "expr:" form, as both files use)."""
    out = {}
    for m in re.finditer(r'^\s*- alert: (\S+)\s*\n(?:\s*#.*\n)*\s*expr: (.+)$', text, re.M):
        out[m.group(1)] = m.group(2).strip()
    return out


def main(h):
    promtool = shutil.which('promtool')
    if promtool is None:
        reason = 'promtool not found (Debian package prometheus; scripts/deps.sh installs it)'
        h.skip_all(reason)
    rules = os.path.join(h.srcdir, 'contrib', 'prometheus', 'tdrain.rules.yml')
    tests = os.path.join(h.srcdir, 'tests', 'prometheus', 'tdrain.rules.test.yml')
    r = h.run([promtool, 'check', 'rules', rules])
    m = re.search(r'SUCCESS: (\d+) rules found', r.stdout + r.stderr)
    h.ok(r.returncode == 0 and m and int(m.group(1)) >= 10,
         'promtool check rules contrib/prometheus/tdrain.rules.yml: %s' % ' '.join((r.stdout + r.stderr).split())[:200])
    # promtool resolves rule_files relative to the test file.
    r = h.run([promtool, 'test', 'rules', tests])
    h.ok(r.returncode == 0 and 'SUCCESS' in r.stdout + r.stderr,
         'promtool test rules tests/prometheus/tdrain.rules.test.yml')
    if r.returncode != 0:
        h.diag((r.stdout + r.stderr)[-3000:])

    shipped = alerts(open(rules).read())
    ops = open(os.path.join(h.srcdir, 'docs', 'OPERATIONS.md')).read()
    documented = {}
    for block in re.findall(r'```yaml\n(.*?)```', ops, re.S):
        documented.update(alerts(block))
    h.ok(documented, 'docs/OPERATIONS.md quotes rules (%s)' % sorted(documented))
    diff = {k: (v, shipped.get(k)) for k, v in documented.items() if shipped.get(k) != v}
    h.ok(not diff, 'every rule docs/OPERATIONS.md quotes is in the file with the same expression %s' % diff)
    names = set(re.findall(r'\b(tdrain_[a-z_]+)\b', open(rules).read()))
    metrics_c = open(os.path.join(h.srcdir, 'worker', 'metrics.c')).read()
    unknown = sorted(n for n in names if '"%s"' % n not in metrics_c)
    h.ok(not unknown, 'every tdrain_* metric the rules use is one worker/metrics.c exports %s' % unknown)


harness.Harness().main(main)
