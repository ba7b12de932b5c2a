"""Unreal recordings (frame_0001.png ... + input.csv) -> checked, indexed training clips."""
