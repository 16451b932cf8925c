"""Bridges to other tools, each behind an optional extra (`pip install 'aecompress[lm-eval]'`)."""
