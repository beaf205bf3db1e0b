//! (the dump: freeze, gather the image, read pages — filled in by the dump/restore core)
