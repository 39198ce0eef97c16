"""Evaluation: dlm-eval's harness and sandbox, middles cut from source trees."""
