"""splitserve: disaggregated LLM serving on Ray that never loses a request."""

__version__ = "0.1.0"
