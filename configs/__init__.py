# Shipped as the package ``hmt_plugin.configs`` (see pyproject.toml): YAML configs for
# ``hmt-tune ls/cp/cat/run``.
