"""``python -m kdexp.dashboard [DIR ...]``: a local web app to watch runs train, compare them, and look inside
teacher ↔ student disagreements (docs/dashboard.md).

``runs`` and ``details`` read run directories (no model is loaded, no UI); ``pages`` and ``app`` draw them with
Streamlit, an optional extra: ``pip install -e ".[dashboard]"``.
"""
