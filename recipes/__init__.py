# Shipped as the package ``hmt_plugin.recipes`` (see pyproject.toml). Run recipes with
# ``hmt-tune run <name>``, or by file path; importing this folder as ``recipes`` clashes with
# the ``recipes`` package torchtune installs.
