"""Request body limits shared by the middleware and the handlers that change them."""

BODY_LIMIT_KEY = "pb.max_body_size"  # scope key: a handler's own limit in bytes, or None for none
DEFAULT_BODY_LIMIT = 32 << 20  # as PocketBase's default
