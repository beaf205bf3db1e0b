//! (open files: dump and recreate every fd kind — filled in by the files work)
