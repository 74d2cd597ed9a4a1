"""Starting and stopping the real services the tests run against."""
