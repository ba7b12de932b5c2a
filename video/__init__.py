"""Video out: the action overlay, MP4/GIF writing, and how well motion follows the actions."""
