"""Playing a streaming model: the player's keys and mouse turned into one action per block,
the generating loop in the background, the local web page that shows it, and the headless
run that streams it into an MP4."""
