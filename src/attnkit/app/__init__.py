"""Front-end commands that belong to no one layer: `attnkit info`, `techniques`, `models ...`, `demo`."""
