"""A shared lease store on PostgreSQL (issue #19): the store, and a throwaway server for tests."""
