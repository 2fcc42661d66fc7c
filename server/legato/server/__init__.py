"""The legato daemon: a grpc.aio server persisting tasks and events to SQLite."""
