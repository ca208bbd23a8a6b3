-- Demo auto-routing: every image a modality stores into this Orthanc is forwarded to BoneBridge.
-- What BoneBridge itself sends back (SR reports, heatmap Secondary Captures) is not forwarded again;
-- BoneBridge would recognise and skip its own objects anyway, this just avoids the round trip.

function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin['RequestOrigin'] == 'DicomProtocol' and origin['RemoteAet'] == 'BONEBRIDGE' then
    return
  end
  if origin['RequestOrigin'] == 'Lua' then
    return
  end
  SendToModality(instanceId, 'bonebridge')
end
