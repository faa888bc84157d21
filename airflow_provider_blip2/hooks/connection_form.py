"""
The ``blip2`` connection's form in the Airflow 2 UI: its extra fields and field behaviour.

Airflow 3.2+ reads the declarative metadata of the provider info instead. Airflow 2 reads these
from the connection type's hook class itself (not from a parent class), so
:class:`~airflow_provider_blip2.hooks.blip2.Blip2Hook` returns them from its own methods.
"""

from __future__ import annotations

from typing import Any

from airflow_provider_blip2.client.settings import CONNECTION_FIELDS, UI_FIELD_BEHAVIOUR


def connection_form_widgets() -> dict[str, Any]:
    """Extra fields of the connection form in the Airflow 2 UI."""
    from flask_appbuilder.fieldwidgets import BS3TextFieldWidget
    from flask_babel import lazy_gettext
    from wtforms import IntegerField, StringField
    from wtforms.validators import NumberRange, Optional

    widgets: dict[str, Any] = {}
    for field in CONNECTION_FIELDS:
        if field.type == "integer":
            widgets[field.name] = IntegerField(
                lazy_gettext(field.label),
                widget=BS3TextFieldWidget(),
                validators=[Optional(), NumberRange(min=field.minimum)],
                default=field.default,
                description=field.description,
            )
        else:
            widgets[field.name] = StringField(
                lazy_gettext(field.label),
                widget=BS3TextFieldWidget(),
                default=field.default,
                description=field.description,
            )
    return widgets


def ui_field_behaviour() -> dict[str, Any]:
    """Hidden, relabelled and pre-filled fields of the connection form in the Airflow 2 UI."""
    return {
        "hidden_fields": list(UI_FIELD_BEHAVIOUR["hidden-fields"]),
        "relabeling": dict(UI_FIELD_BEHAVIOUR["relabeling"]),
        "placeholders": dict(UI_FIELD_BEHAVIOUR["placeholders"]),
    }
