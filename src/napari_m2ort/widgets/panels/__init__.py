"""One-file Qt panels the dock widgets are composed of; each binds its controls to a
field of the widget's state (``widgets.state``) and computes nothing itself."""
