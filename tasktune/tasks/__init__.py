"""Task declarations: specs, templates, parsers, the registry and the built-in DU tasks."""

from tasktune.tasks.spec import DataSource, Example, Origin, Rendered, Task, Template

__all__ = ["DataSource", "Example", "Origin", "Rendered", "Task", "Template"]
