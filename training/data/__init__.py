"""Fast data preparation for every trainer (DESIGN.md, "Fast data preparation").

- :mod:`training.data.images`: decoding to 3-channel RGB (JPEG ``draft()`` reduced-DCT
  decoding, every PIL mode forced to RGB) and resize-shortest-side + crop geometry.
- :mod:`training.data.photos`: assembles the curated training photos (``percept data photos``).
- :mod:`training.data.prepare`: contiguous uint8 arrays over a process pool
  (``percept data prepare``).
- :mod:`training.data.arrays`: reads prepared arrays back for the trainers (numpy only).
- :mod:`training.data.cli`: the argparse front end the ``percept`` CLI wires in.
"""
