"""What routes read and do through ingest: the read side and the actions
(``ingest.readside``), set on the app by ``create_app``. Routes never see the ``Ingest``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ingest.readside import Actions, ReadSide


def get_read(request: Request) -> ReadSide:
    read: ReadSide = request.app.state.read
    return read


def get_actions(request: Request) -> Actions:
    actions: Actions = request.app.state.actions
    return actions


ReadDep = Annotated[ReadSide, Depends(get_read)]
ActionsDep = Annotated[Actions, Depends(get_actions)]
