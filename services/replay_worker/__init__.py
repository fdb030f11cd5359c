"""The replay worker: what a config would have decided on labelled or captured requests,
next to the current config and simple baselines, with a receipt; the change gate; and
the comparison of live and shadow decisions."""
