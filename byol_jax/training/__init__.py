"""One BYOL update: loss, monitors, LARS and schedules, on-device augmentation, the pmapped step."""
