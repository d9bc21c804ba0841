"""Generic helpers with no imports from the rest of the app (as PocketBase's tools/)."""
