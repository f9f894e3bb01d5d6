"""Serving decisions without Ray: certificates, ERASER policies, the serving view of pending
deletions, the gateway fence, the answer journal and its replay."""
