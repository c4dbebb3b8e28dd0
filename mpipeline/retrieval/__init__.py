"""Retrievers behind the rag stage."""
