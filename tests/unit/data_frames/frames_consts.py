"""Constants of the frames-shard test fixtures (a uniquely named module: several test folders
have a conftest.py, and only one can be imported as ``conftest``)."""

SOURCES = ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4")
FPS = 8.0
SHORT_SIDE = 144
QUALITY = 90
