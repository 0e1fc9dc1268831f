"""Test-wide setup: the handler reads its settings at import, so the environment comes first."""

import os

from preagg_cli.local import LOCAL_DEFAULTS

for _name, _value in LOCAL_DEFAULTS.items():
    os.environ.setdefault(_name, _value)
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
