"""Turning a trained model into video: bidirectional windows and real-time streaming."""
